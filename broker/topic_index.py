"""Topic names, topic filters, and a tree that matches one kind against the other (MQTT 3.1.1 §4.7).

Pure code: no sockets, no amqtt. The broker keeps two ``TopicTree``s:

* the *subscription* tree holds topic filters; ``filters_matching(topic)`` answers "who gets this
  publish" by walking only the branches the topic can reach, instead of amqtt's loop over every
  filter (``amqtt.broker.Broker._run_broadcast``);
* the *retained* tree holds topic names; ``topics_matching(filter)`` answers "which retained
  messages does this new subscription get", instead of amqtt's scan of every retained message
  (``Broker._publish_retained_messages_for_subscription``).

Both walks cost the depth of the topic plus the number of matches, so connecting N devices that each
subscribe to their own topics costs O(N), not O(N²).
"""

from __future__ import annotations

from collections.abc import Iterator

# [MQTT-4.7.2-1]: a filter starting with a wildcard does not match a topic starting with "$".
_DOLLAR = "$"
SHARE_PREFIX = "$share/"


def shared_subscription(topic_filter: str) -> tuple[str, str] | None:
    """(group, filter) of a ``$share/{group}/{filter}`` subscription, or None for an ordinary filter.

    Shared subscriptions are MQTT 5 (§4.8.2); Mosquitto also honours them for 3.1.1 clients, and so
    does the hardened broker: each message matching ``filter`` goes to one member of the group.
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, _, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
    return group, inner


def topic_name_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be the topic of a PUBLISH, or None when it can."""
    if not topic:
        return "empty topic name [MQTT-4.7.3-1]"
    if "+" in topic or "#" in topic:
        return "wildcard in a topic name [MQTT-3.3.2-2]"
    if "\x00" in topic:
        return "U+0000 in a topic name [MQTT-4.7.3-2]"
    return None


def topic_filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` cannot be subscribed to, or None when it can."""
    if not topic_filter:
        return "empty topic filter [MQTT-4.7.3-1]"
    shared = shared_subscription(topic_filter)
    if shared is not None:
        group, inner = shared
        if not group or "+" in group or "#" in group:
            return "shared subscription group must be a non-empty name without wildcards"
        if not inner:
            return "shared subscription without a topic filter"
        topic_filter = inner
    if "\x00" in topic_filter:
        return "U+0000 in a topic filter [MQTT-4.7.3-2]"
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return "'#' must be a whole level and the last one [MQTT-4.7.1-2]"
        if "+" in level and level != "+":
            return "'+' must be a whole level [MQTT-4.7.1-3]"
    return None


def matches(topic: str, topic_filter: str) -> bool:
    """Whether ``topic`` matches ``topic_filter``: the reference rule that the tree must agree with."""
    if topic.startswith(_DOLLAR) and topic_filter[:1] in ("+", "#"):
        return False
    t_levels = topic.split("/")
    f_levels = topic_filter.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            return True
        if index >= len(t_levels):
            return False
        if level not in ("+", t_levels[index]):
            return False
    return len(t_levels) == len(f_levels)


class _Node:
    __slots__ = ("children", "key")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.key: str | None = None


class TopicTree:
    """A set of topic strings (names or filters) stored level by level."""

    __slots__ = ("_root", "_size")

    def __init__(self) -> None:
        self._root = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        node: _Node | None = self._root
        for level in key.split("/"):
            node = node.children.get(level) if node else None
        return node is not None and node.key is not None

    def add(self, key: str) -> None:
        """Insert ``key``; inserting twice is a no-op."""
        node = self._root
        for level in key.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if node.key is None:
            node.key = key
            self._size += 1

    def discard(self, key: str) -> None:
        """Remove ``key`` if present, pruning branches that hold nothing any more."""
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in key.split("/"):
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        if node.key is None:
            return
        node.key = None
        self._size -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.key is not None or child.children:
                break
            del parent.children[level]

    def __iter__(self) -> Iterator[str]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.key is not None:
                yield node.key
            stack.extend(node.children.values())

    def filters_matching(self, topic: str) -> list[str]:
        """The stored filters that match the topic name ``topic``."""
        levels = topic.split("/")
        out: list[str] = []
        dollar = topic.startswith(_DOLLAR)
        # (node, index of the next topic level to match)
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        last = len(levels)
        while stack:
            node, index = stack.pop()
            children = node.children
            hash_node = children.get("#")
            if hash_node is not None and hash_node.key is not None and not (dollar and index == 0):
                # "a/#" matches "a" as well as everything below it [MQTT-4.7.1-2].
                out.append(hash_node.key)
            if index == last:
                if node.key is not None:
                    out.append(node.key)
                continue
            exact = children.get(levels[index])
            if exact is not None:
                stack.append((exact, index + 1))
            plus = children.get("+")
            if plus is not None and not (dollar and index == 0) and levels[index] != "+":
                stack.append((plus, index + 1))
        return out

    def topics_matching(self, topic_filter: str) -> list[str]:
        """The stored topic names that the filter ``topic_filter`` matches."""
        levels = topic_filter.split("/")
        out: list[str] = []
        last = len(levels)
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if index == last:
                if node.key is not None:
                    out.append(node.key)
                continue
            level = levels[index]
            if level == "#":
                if node.key is not None:
                    out.append(node.key)
                for name, child in node.children.items():
                    if index == 0 and name.startswith(_DOLLAR):
                        continue
                    out.extend(_subtree_keys(child))
            elif level == "+":
                for name, child in node.children.items():
                    if index == 0 and name.startswith(_DOLLAR):
                        continue
                    stack.append((child, index + 1))
            else:
                exact = node.children.get(level)
                if exact is not None:
                    stack.append((exact, index + 1))
        return out


def _subtree_keys(node: _Node) -> Iterator[str]:
    stack = [node]
    while stack:
        current = stack.pop()
        if current.key is not None:
            yield current.key
        stack.extend(current.children.values())
