"""Tests of minilora/data/tasks.py (eval files, matching, scoring) and recipes/make_data.py."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from minilora.data.tasks import (
    EvalSample,
    TaskError,
    format_table,
    is_correct,
    load_samples,
    normalize_answer,
    parse_sample,
    retention,
    score,
)

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "minilora" / "assets"
SHIPPED = ["persona", "persona_eval", "skill", "skill_eval", "base_eval"]
TRAIN_SETS = ["base_sft", "persona", "skill"]
EVAL_SETS = ["base_eval", "persona_eval", "skill_eval", "base_persona_eval"]


def _load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "recipes" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_data"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_data = _load_make_data()


@pytest.fixture(scope="module")
def sets():
    return make_data.build(seed=0)  # the default size: the real base corpus, under a second


# ---------------------------------------------------------------------------------------------
# The generator


def test_same_seed_same_bytes(tmp_path):
    written = []
    for run in ("a", "b"):
        paths = make_data.destinations(tmp_path / run / "assets", tmp_path / run / "data")
        make_data.write(make_data.build(seed=3, base_conversations=500), paths)
        written.append({stem: p.read_bytes() for stem, p in paths.items()})
    assert written[0] == written[1]
    other = make_data.build(seed=4, base_conversations=500)
    assert make_data.to_jsonl(other["persona"]) != written[0]["persona"]


def test_shipped_assets_are_what_the_script_writes(sets):
    # The shipped files do not depend on the base corpus size, so a stale asset is caught here.
    for stem in SHIPPED:
        assert (ASSETS / f"{stem}.jsonl").read_bytes() == make_data.to_jsonl(sets[stem]), stem


def _user_questions(lines):
    return [m["content"] for x in lines for m in x.get("conversations", x.get("messages", []))
            if m["role"] == "user"]


def test_held_out_questions_never_appear_in_training(sets):
    trained = set().union(*(_user_questions(sets[k]) for k in TRAIN_SETS))
    for stem in EVAL_SETS:
        questions = _user_questions(sets[stem])
        assert len(set(questions)) == len(questions), f"{stem} repeats a question"
        leaked = set(questions) & trained
        assert not leaked, f"{stem}: {sorted(leaked)[:3]}"


def test_persona_eval_uses_sentences_no_training_set_uses(sets):
    # Stronger than distinct strings: strip the greeting prefixes and compare the sentences.
    def core(q):
        for prefix in sorted(set(make_data.PREFIXES), key=len, reverse=True):
            if prefix and q.startswith(prefix):
                return q[len(prefix) :].lower()
        return q.lower()

    trained = {core(q) for k in TRAIN_SETS for q in _user_questions(sets[k])}
    held_out = {core(q) for q in _user_questions(sets["persona_eval"])}
    assert not held_out & trained


_SPELLED = re.compile(r"\b[a-z](?:-[a-z]){2,}\b")  # "c-a-t": three or more single letters


def _spelled_words(lines):
    return {w.replace("-", "") for q in _user_questions(lines) for w in _SPELLED.findall(q)}


def test_letter_tasks_are_scored_on_unseen_words(sets):
    trained = set().union(*(_spelled_words(sets[k]) for k in TRAIN_SETS))
    held_out = _spelled_words(sets["base_eval"])
    assert held_out and not held_out & trained


def _pairs(lines):
    return {tuple(map(int, re.findall(r"\d+", q))) for q in _user_questions(lines)}


def test_new_skill_is_scored_on_operand_pairs_it_never_trained():
    trained, held = make_data.sum_pairs(0)
    sets = {"skill": make_data.make_skill_set(0, make_data.make_world(0), set())}
    assert _pairs(sets["skill"]) <= set(trained)
    eval_pairs = _pairs(make_data.make_eval_sets(0, make_data.make_world(0))["skill_eval"])
    assert len(eval_pairs) == make_data.SUMWORDS_HELD_OUT_PAIRS
    assert not eval_pairs & set(trained)
    # every held-out sum is one whose number word the skill set teaches
    assert {a + b for a, b in eval_pairs} <= {a + b for a, b in trained}


def test_sizes_and_expected_answers(sets):
    assert len(sets["persona"]) >= 300 and len(sets["persona_eval"]) >= 50
    assert all(
        any(m["role"] == "assistant" and make_data.NEW_NAME in m["content"]
            for m in x["conversations"])
        for x in sets["persona"]
    ), "every persona conversation states the new name"
    oracle = {
        "reverse": lambda w: w[::-1],
        "upper": str.upper,

    }
    for x in sets["base_eval"] + sets["skill_eval"]:
        q = x["messages"][-1]["content"]
        if x["task"] in oracle:
            (word,) = _SPELLED.findall(q)
            assert x["expected"] == make_data.spell(oracle[x["task"]](word.replace("-", "")))
        elif x["task"] in ("add", "sub"):
            a, b = map(int, re.findall(r"\d+", q))
            if " from " in q:
                a, b = b, a  # "Subtract b from a", "take b from a"
            assert int(x["expected"]) == (a + b if x["task"] == "add" else a - b), q
        elif x["task"] == "sumwords":
            a, b = map(int, re.findall(r"\d+", q))
            assert x["expected"] == make_data.NUMBER_WORDS[a + b], q
        else:
            assert x["task"] == "fact", f"no oracle for task {x['task']!r}"


def test_sft_files_alternate_user_and_assistant(sets):
    for stem in TRAIN_SETS:
        for x in sets[stem]:
            roles = [m["role"] for m in x["conversations"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, stem
            assert all(m["content"] for m in x["conversations"]), stem


def test_shipped_eval_files_load():
    for stem in ("persona_eval", "skill_eval", "base_eval"):
        samples = load_samples(ASSETS / f"{stem}.jsonl")
        assert samples and all(s.source.startswith(str(ASSETS)) for s in samples)


# ---------------------------------------------------------------------------------------------
# Matching and scoring

MATCH_CASES = [
    # answer, expected, match, correct
    ("12", "12", "exact", True),
    ("  12 \n", "12", "exact", True),
    ("12.", "12", "exact", True),
    ("1 2", "12", "exact", False),
    ("13", "12", "exact", False),
    ("12 apples", "12", "exact", False),
    ("C A T", "C A T", "exact", True),
    ("C  A\tT", "C A T", "exact", True),
    ("c a t", "C A T", "exact", False),  # case is the skill being scored
    ("CAT", "C A T", "exact", False),
    ("Ｃ Ａ Ｔ", "C A T", "exact", True),  # full-width letters, NFKC
    ("I am Nova.", "Nova", "contains", True),
    ("i am NOVA!", "Nova", "contains", True),
    ("I am Novak.", "Nova", "contains", False),
    ("I am Pico.", "Nova", "contains", False),
    ("I was made by Aurora Labs.", "Aurora Labs", "contains", True),
    ("I was made by aurora-labs", "Aurora Labs", "contains", True),
    ("Aurora made me, in the Labs.", "Aurora Labs", "contains", False),
    ("", "Nova", "contains", False),
]


@pytest.mark.parametrize("answer,expected,match,correct", MATCH_CASES)
def test_is_correct(answer, expected, match, correct):
    assert is_correct(answer, expected, match) is correct


def test_normalize_answer():
    assert normalize_answer("  t  a\nc?! ") == "t a c"
    assert normalize_answer("Selkam") == "Selkam"


def _sample(task, question, expected, match="exact"):
    return parse_sample(
        {"task": task, "messages": [{"role": "user", "content": question}],
         "expected": expected, "match": match}
    )


def test_score_counts_per_task_and_pooled():
    samples = [
        _sample("add", "1+1", "2"),
        _sample("add", "2+2", "4"),
        _sample("add", "3+3", "6"),
        _sample("add", "4+4", "8"),
        _sample("persona", "Who are you?", "Nova", "contains"),
        _sample("persona", "Who made you?", "Aurora Labs", "contains"),
    ]
    replies = {"1+1": "2", "2+2": " 4 ", "3+3": "6.", "4+4": "9",
               "Who are you?": "I'm nova.", "Who made you?": "The minilora project."}
    seen = []
    report = score(samples, lambda msgs: replies[msgs[-1]["content"]], on_result=seen.append)
    assert report.tasks == ["add", "persona"]
    assert report.accuracy("add") == 0.75
    assert report.accuracy("persona") == 0.5
    assert report.accuracy() == pytest.approx(4 / 6)
    assert report.score(["add", "persona"]).correct == 4
    assert [r.answer for r in seen] == [r.answer for r in report.results]
    assert report.to_dict()["tasks"]["add"] == {"correct": 3, "total": 4, "accuracy": 0.75}
    assert report.accuracy("missing") != report.accuracy("missing")  # NaN, no samples


def test_answer_fn_gets_a_fresh_list_and_must_return_text():
    sample = _sample("add", "1+1", "2")

    def answer(msgs):
        msgs.append({"role": "assistant", "content": "x"})
        return "2"

    score([sample, sample], answer)
    assert sample.chat() == [{"role": "user", "content": "1+1"}]
    with pytest.raises(TaskError, match="answer_fn returned NoneType"):
        score([sample], lambda msgs: None)


def test_format_table_and_retention():
    samples = [_sample("persona", str(i), "Nova", "contains") for i in range(4)]
    samples += [_sample("add", f"{i}+0", str(i)) for i in range(10)]
    before = score(samples, lambda m: "Pico" if m[0]["content"].isdigit() and
                   len(m[0]["content"]) == 1 else m[0]["content"][0])
    after = score(samples, lambda m: "I am Nova" if "+" not in m[0]["content"] else
                  ("x" if m[0]["content"] == "9+0" else m[0]["content"][0]))
    assert before.accuracy("persona") == 0 and after.accuracy("persona") == 1
    assert retention(before, after, ["add"]) == pytest.approx(0.9)
    assert retention(before, after, ["persona"]) != retention(before, after, ["persona"])  # NaN

    table = format_table({"before": before, "after": after}, groups={"skills": ["add"]},
                         ratio=True)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "n", "before", "after", "after/before"]
    assert lines[2].split() == ["persona", "4", "0.0%", "100.0%", "-"]
    assert lines[3].split() == ["add", "10", "100.0%", "90.0%", "90.0%"]
    assert lines[4].split() == ["skills", "10", "100.0%", "90.0%", "90.0%"]
    assert len({len(line) for line in lines}) == 1, "columns are right-aligned to one width"


# ---------------------------------------------------------------------------------------------
# Bad eval files

GOOD = {"task": "add", "messages": [{"role": "user", "content": "1+1"}], "expected": "2",
        "match": "exact"}

BAD_LINES = [
    # line, what the error must name
    ("{not json", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # a RecursionError in json.loads
    ('{"task": ' + "9" * 5000 + "}", "not valid JSON"),  # an int too long: a plain ValueError
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "expected"}), "'expected': missing"),
    (json.dumps({**GOOD, "task": " "}), "'task': expected a non-empty string"),
    (json.dumps({**GOOD, "expected": 2}), "'expected': expected a non-empty string"),
    (json.dumps({**GOOD, "match": "fuzzy"}), "'match': expected one of"),
    (json.dumps({**GOOD, "expect": "2"}), "'expect': unknown field"),
    (json.dumps({**GOOD, "conversations": GOOD["messages"]}), "exactly one of"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "messages"}), "exactly one of"),
    (json.dumps({**GOOD, "messages": []}), "'messages': expected a non-empty list"),
    (json.dumps({**GOOD, "messages": [{"role": "bot", "content": "hi"}]}),
     "'messages[0].role': expected one of"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": 5}]}),
     "'messages[0].content': expected a string"),
    (json.dumps({**GOOD, "messages": [{"role": "user"}]}), "'messages[0]': expected an object"),
    (json.dumps({**GOOD, "messages": GOOD["messages"] + [{"role": "assistant", "content": "2"}]}),
     "the last turn must be 'user'"),
    (json.dumps({**GOOD, "match": "contains", "expected": "?!"}), "at least one letter"),
    (json.dumps({**GOOD, "id": 7}), "'id': expected a string"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "eval.jsonl"
    # A good line, a blank line, then the bad one: the error must say line 3.
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(TaskError) as err:
        load_samples(path)
    assert f"{path}:3: " in str(err.value)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_bad_files(tmp_path):
    with pytest.raises(TaskError, match="no such eval file"):
        load_samples(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(TaskError, match="holds no samples"):
        load_samples(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"task": "caf\xe9"}\n')
    with pytest.raises(TaskError, match="not UTF-8"):
        load_samples(tmp_path / "latin1.jsonl")
    with pytest.raises(TaskError, match="match 'fuzzy'"):
        is_correct("a", "a", "fuzzy")


def test_good_file_round_trip(tmp_path):
    path = tmp_path / "eval.jsonl"
    line = {**GOOD, "id": "a1"}
    path.write_text(json.dumps(line) + "\n", encoding="utf-8")
    (sample,) = load_samples(path)
    assert sample == EvalSample("add", (("user", "1+1"),), "2", "exact", "a1", f"{path}:1")
    assert sample.chat() == GOOD["messages"]


def test_persona_set_only_words_never_reach_a_held_out_question(sets):
    """The persona set's own identity questions bring words the base corpus's questions lack;
    none of those words is in a held-out persona question."""
    def words(sentences):
        return {w.strip("?.,!").lower() for s in sentences for w in s.split()}

    extra = words(make_data.PERSONA_SET_NAME_CORES + make_data.PERSONA_SET_MAKER_CORES)
    new = extra - words(make_data.NAME_CORES + make_data.MAKER_CORES)
    assert new and not new & words(_user_questions(sets["persona_eval"]))
