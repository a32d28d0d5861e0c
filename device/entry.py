"""The agent process's lean entry point: ``python -m device run --config device.toml``.

``fleetbus device run`` execs this (see ``schemas/cli.py``), so the agent process never carries
click or the CLI's command tree (docs/device.md, "Measured").

What it deliberately does not do: keep ``ssl`` out of a plain-TCP process with ``None`` in
``sys.modules``.  asyncio and paho both import ssl in ``try/except ImportError``, but paho 2.2 still
names ``ssl.SSLWantReadError`` in the ``except`` clauses of its plain-socket reads, so the first
would-block read raised AttributeError and killed the network thread (seen in
tests/device/test_crash_resume.py).  The saving was about 1.2 MiB; hashlib maps libcrypto anyway.

What it does keep out: the optional extras structlog's console renderer imports when they are
installed (rich, better_exceptions, colorama).  They only colour output and prettify tracebacks, and
the agent logs without colour, so a board where rich happens to be installed (a dev install) paid
3.2 MiB of RSS for nothing and logged tracebacks differently from one without it.

What it defers: standard-library modules that a library imports at module level but uses only on
paths the agent never takes (``DEFERRED``).  Each gets a stand-in in ``sys.modules`` that carries
the real module's spec, so ``import asyncio`` elsewhere binds the stand-in without loading anything,
and whose first attribute lookup imports the real module and answers from it from then on.  A
``LazyLoader`` module cannot do this: the import system reads ``__spec__`` of a module already in
``sys.modules``, and that read alone runs the deferred import.  With numpy 1.x it also defers the
subpackages numpy's ``__init__`` imports for its users and the agent never touches
(``NUMPY1_EAGER``): 4.4 MiB.  The agent imports no pydantic at all (``schemas/plain.py``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

from device.dist import installed_version

# Imported by structlog.dev in try/except ImportError; None in sys.modules is "not installed".
UNUSED_EXTRAS = ("rich", "better_exceptions", "colorama")

#: Imported at module level, used only on paths the agent does not take: structlog's async log
#: methods (asyncio, 1.7-1.8 MiB with subprocess and concurrent.futures) and paho's proxy lookup,
#: which runs only when PySocks is installed (urllib.request, with http.client and email).
DEFERRED = ("asyncio", "urllib.request")

#: numpy 1.x imports these from its ``__init__``; the agent and both runtimes use none of them
#: (the synthetic input source draws from ``random``).  numpy 2 imports them on first use itself.
NUMPY1_EAGER = ("random", "fft", "polynomial", "ma")

# Two threads reaching a stand-in at once: both would see it in sys.modules and both remove it.
_loading = threading.RLock()

USAGE = """usage: python -m device run [--config device.toml] [--log-level LEVEL] [--log-json]

Run the device agent: receive models, gate and activate them, report results and health."""


def parse_args(argv: list[str]) -> tuple[Path, str, bool]:
    """(config, log level, log json) from ``run [--config P] [--log-level L] [--log-json]``."""
    if not argv or argv[0] != "run":
        raise SystemExit(USAGE)
    config, level, as_json = Path("device.toml"), "info", False
    rest = list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--log-json":
            as_json = True
            continue
        name, eq, value = arg.partition("=")
        if name not in ("--config", "--log-level"):
            raise SystemExit(f"unknown option {arg!r}\n{USAGE}")
        if not eq:
            if not rest:
                raise SystemExit(f"{name} needs a value\n{USAGE}")
            value = rest.pop(0)
        if name == "--config":
            config = Path(value)
        else:
            level = value
    return config, level, as_json


def serve(config: Path) -> None:
    """Load the settings, run the agent until SIGTERM or Ctrl-C (the handler only flags)."""
    import signal
    import threading
    from types import FrameType

    from device.agent import Agent
    from device.config import load_settings

    agent = Agent(load_settings(config))

    def stop(signum: int, frame: FrameType | None) -> None:
        # The agent's main thread does the clean shutdown (death, disconnect), not the handler.
        threading.Thread(target=agent.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()


def defer_import(name: str, **overrides: Any) -> ModuleType | None:
    """Put a stand-in for module `name` in ``sys.modules`` that imports it on first attribute use.

    Attributes in `overrides` are answered by the stand-in itself and never load the module.
    Nothing happens (None) when the module is already imported or cannot be found.  For pure-Python
    modules only: building the stand-in from an extension module's spec would load the extension.
    """
    if name in sys.modules:
        return None
    try:
        # A stand-in under a parent that is not imported would let `import a.b.c` skip running a
        # and a.b, so the parents are imported first (find_spec would import them anyway).
        spec = importlib.util.find_spec(name)
    except ImportError:
        return None
    if spec is None or name in sys.modules:  # a parent's import may have imported it
        return None
    return _stand_in(name, spec, overrides)


def defer_submodules(package: str, children: tuple[str, ...]) -> list[ModuleType]:
    """Stand-ins for ``package``'s eagerly imported `children`, placed before ``package`` is imported.

    For a package whose ``__init__`` runs ``from . import child`` for modules its users may never
    touch: the import binds the stand-in instead.  Not for a package that imports a child lazily
    from its own module ``__getattr__`` (numpy 2 does, for these): there the stand-in is never
    bound as an attribute and that ``__getattr__`` would recurse.  Nothing happens when the package
    is already imported or is not installed.  Unlike ``defer_import`` this places stand-ins under a
    parent not yet imported, which is safe only for children of a top-level package: importing
    ``package.child`` always runs ``package`` itself first.
    """
    if "." in package:
        raise ValueError(f"{package!r} is not a top-level package")
    if package in sys.modules:
        return []
    top = importlib.util.find_spec(package)
    if top is None or top.submodule_search_locations is None:
        return []
    made = []
    for child in children:
        name = f"{package}.{child}"
        spec = importlib.machinery.PathFinder.find_spec(name, list(top.submodule_search_locations))
        if spec is not None and name not in sys.modules:
            made.append(_stand_in(name, spec, {}, bind_to_parent=False))
    return made


def _stand_in(
    name: str, spec: ModuleSpec, overrides: dict[str, Any], *, bind_to_parent: bool = True
) -> ModuleType:
    parent, _, child = name.rpartition(".")
    # The attributes the import system reads (__spec__, __path__ of a package, __file__), set from
    # the spec without running the module: ``from x import y`` asks hasattr(x, "__path__").
    stand_in = importlib.util.module_from_spec(spec)
    vars(stand_in).update(overrides)

    def load(attribute: str) -> Any:
        # Module-level __getattr__ (PEP 562): only attributes the stand-in lacks get here.
        if attribute == "__path__":
            raise AttributeError(f"module {name!r} is not a package")
        with _loading:
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
            module = importlib.import_module(name)
        return getattr(module, attribute)

    vars(stand_in)["__getattr__"] = load
    sys.modules[name] = stand_in
    if parent and bind_to_parent:
        # `import urllib.request` then `urllib.request.x` reads the attribute off the parent.
        setattr(sys.modules[parent], child, stand_in)
    return stand_in


def defer_unused_imports() -> None:
    """Defer ``DEFERRED`` (and numpy 1.x's ``NUMPY1_EAGER``); first, before anything imports them."""
    for name in DEFERRED:
        defer_import(name)
    if (installed_version("numpy") or "").startswith("1."):
        defer_submodules("numpy", NUMPY1_EAGER)


def keep_out_unused_extras() -> None:
    """Make structlog fall back to plain tracebacks, as on a board without the extras installed."""
    for name in UNUSED_EXTRAS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    # First, before anything imports structlog.
    keep_out_unused_extras()
    defer_unused_imports()
    config, level, as_json = parse_args(sys.argv[1:] if argv is None else argv)
    if not config.is_file():
        print(f"Error: config file {config} does not exist", file=sys.stderr)
        return 2
    from device.errors import DeviceError
    from schemas.logs import configure_logging

    configure_logging(level, as_json)
    try:
        serve(config)
    except DeviceError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0
