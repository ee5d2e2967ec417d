"""The one stop-sequence hold-back, on token ids (``generate``) and on text (the server)."""

import random

from minilora.decoding.stops import held_back


def longest_proper_prefix_suffix(pending, stops):
    """The definition, written out: the largest n such that pending's last n items are the
    first n of some stop longer than n."""
    best = 0
    for s in stops:
        for n in range(1, min(len(pending), len(s) - 1) + 1):
            if list(pending[len(pending) - n:]) == list(s[:n]):
                best = max(best, n)
    return best


def test_text_and_token_ids_hold_back_the_same_amount():
    assert held_back("the answer is Obs", ["Observation:", "\n\n"]) == 3
    assert held_back("done\n", ["\n\n"]) == 1
    assert held_back("done", ["\n\n"]) == 0
    assert held_back("ab", ["ab"]) == 0  # a whole stop is not held back: it ends the answer
    assert held_back([5, 7, 1, 2], [[1, 2, 3], [9]]) == 2
    assert held_back([], [[1, 2]]) == 0 and held_back("abc", []) == 0
    rng = random.Random(0)
    for _ in range(500):
        pending = [rng.randrange(3) for _ in range(rng.randrange(8))]
        stops = [[rng.randrange(3) for _ in range(rng.randrange(1, 5))]
                 for _ in range(rng.randrange(1, 4))]
        want = longest_proper_prefix_suffix(pending, stops)
        assert held_back(pending, stops) == want, (pending, stops)
        text, text_stops = "".join(map(str, pending)), ["".join(map(str, s)) for s in stops]
        assert held_back(text, text_stops) == want, (text, text_stops)
