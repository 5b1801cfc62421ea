import pytest

from relift_pl.buffer import DemonstrationBuffer


def rows(*ids):
    return [{"id": i} for i in ids]


def test_pop_waits_for_threshold_and_returns_newest_first():
    buffer = DemonstrationBuffer(threshold=3, capacity=10)
    buffer.push(rows("a", "b"))
    assert not buffer.ready
    with pytest.raises(RuntimeError, match="holds 2 rows, fewer than the 3 requested"):
        buffer.pop()
    buffer.push(rows("c", "d"))
    assert buffer.ready
    # Newest first: d was pushed last.
    assert [r["id"] for r in buffer.pop()] == ["d", "c", "b"]
    # The leftover stays for the next SFT step.
    assert len(buffer) == 1 and not buffer.ready


def test_capacity_drops_oldest_and_counts():
    buffer = DemonstrationBuffer(threshold=2, capacity=3)
    buffer.push(rows("a", "b", "c", "d", "e"))
    assert len(buffer) == 3
    assert buffer.dropped == 2
    assert [r["id"] for r in buffer.pop()] == ["e", "d"]


def test_state_round_trip_preserves_order_and_counters():
    buffer = DemonstrationBuffer(threshold=2, capacity=5)
    buffer.push(rows("a", "b", "c"))
    restored = DemonstrationBuffer(threshold=2, capacity=5)
    restored.load_state_dict(buffer.state_dict())
    assert restored.pop() == buffer.pop()
    assert len(restored) == len(buffer) == 1


@pytest.mark.parametrize(
    ("threshold", "capacity", "message"),
    [(0, None, "threshold"), (4, 3, "capacity")],
)
def test_invalid_sizes_name_the_key(threshold, capacity, message):
    with pytest.raises(ValueError, match=message):
        DemonstrationBuffer(threshold=threshold, capacity=capacity)


def test_pop_n_takes_fewer_than_m_newest_first():
    # The every-step schedule fine-tunes on whatever is buffered, without waiting for M.
    buffer = DemonstrationBuffer(threshold=4, capacity=8)
    buffer.push(rows("a", "b", "c"))
    assert [r["id"] for r in buffer.pop(2)] == ["c", "b"]
    assert [r["id"] for r in buffer.state_dict()["rows"]] == ["a"]
