"""broker/topic_index.py: topic rules and the tree that replaces amqtt's linear scans (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.topic_index import TopicTree, matches, topic_filter_problem, topic_name_problem

_levels = st.sampled_from(["a", "b", "", "$SYS", "dev", "x1"])
topic_names = st.lists(_levels, min_size=1, max_size=5).map("/".join).filter(lambda t: t != "")
topic_filters = (
    st.lists(st.one_of(_levels, st.just("+")), min_size=1, max_size=5)
    .flatmap(lambda levels: st.booleans().map(lambda hash_: "/".join([*levels, "#"] if hash_ else levels)))
    .filter(lambda f: f != "")
)


@pytest.mark.parametrize(
    ("topic", "topic_filter", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/+", True),
        ("a/b", "#", True),
        ("a", "a/#", True),
        ("a/b/c", "a/+", False),
        ("a/b", "+/+/+", False),
        ("$SYS/x", "#", False),
        ("$SYS/x", "+/x", False),
        ("$SYS/x", "$SYS/#", True),
        ("a//b", "a/+/b", True),
        ("/a", "+/a", True),
    ],
)
def test_reference_matching_follows_the_spec(topic: str, topic_filter: str, expected: bool) -> None:
    """matches() implements §4.7 including '#' matching the parent level and the '$' exception."""
    assert matches(topic, topic_filter) is expected


@settings(max_examples=400)
@given(st.sets(topic_filters, max_size=12), topic_names)
def test_filters_matching_agrees_with_the_reference(filters: set[str], topic: str) -> None:
    """The subscription tree returns exactly the filters that match a topic, each once."""
    tree = TopicTree()
    for f in filters:
        tree.add(f)
    got = tree.filters_matching(topic)
    assert len(got) == len(set(got))
    assert set(got) == {f for f in filters if matches(topic, f)}


@settings(max_examples=400)
@given(st.sets(topic_names, max_size=12), topic_filters)
def test_topics_matching_agrees_with_the_reference(topics: set[str], topic_filter: str) -> None:
    """The retained tree returns exactly the stored topics a filter matches."""
    tree = TopicTree()
    for t in topics:
        tree.add(t)
    got = tree.topics_matching(topic_filter)
    assert sorted(got) == sorted(t for t in topics if matches(t, topic_filter))


@settings(max_examples=200)
@given(st.lists(topic_filters, max_size=12), st.data())
def test_discard_prunes_and_keeps_the_rest(keys: list[str], data: st.DataObject) -> None:
    """Removing keys leaves exactly the others, and the size follows."""
    tree = TopicTree()
    for k in keys:
        tree.add(k)
    removed = set(data.draw(st.lists(st.sampled_from(keys))) if keys else [])
    for k in removed:
        tree.discard(k)
    tree.discard("never/added")
    assert set(tree) == set(keys) - removed
    assert len(tree) == len(set(keys) - removed)
    assert all((k in tree) == (k not in removed) for k in keys)


@pytest.mark.parametrize("topic", ["", "a/+", "#", "a/#/b", "a\x00b"])
def test_bad_topic_names_are_named(topic: str) -> None:
    """Empty names, wildcards and U+0000 are not topic names."""
    assert topic_name_problem(topic)


@pytest.mark.parametrize(
    "topic_filter", ["", "a/#/b", "a#", "a/b+", "+a", "#/", "a\x00", "$share//a", "$share/g", "$share/g+/a"]
)
def test_bad_topic_filters_are_named(topic_filter: str) -> None:
    """Empty filters and misplaced wildcards are not topic filters."""
    assert topic_filter_problem(topic_filter)


@pytest.mark.parametrize("topic_filter", ["#", "+", "a/+/b", "a/#", "+/+", "/", "$SYS/#", "$share/g/a/+"])
def test_good_topic_filters_pass(topic_filter: str) -> None:
    """Whole-level wildcards anywhere ('#' last) are fine."""
    assert topic_filter_problem(topic_filter) is None


def test_shared_subscription_is_split_into_group_and_filter() -> None:
    """$share/{group}/{filter} yields its group and filter; other filters are not shared."""
    from broker.topic_index import shared_subscription

    assert shared_subscription("$share/agg/fleetbus/v1/dev/+/health") == ("agg", "fleetbus/v1/dev/+/health")
    assert shared_subscription("fleetbus/v1/#") is None
