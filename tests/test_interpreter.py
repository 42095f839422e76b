"""Code-interpreter rollouts with a scripted model: token-exact trajectories and masks.

`ScriptedSampler` implements the sampler's step interface (add_request / step / append_tokens /
completion / release) but, instead of a network, emits the tokens of given text turns one per
step, honouring stop_fn, stop tokens and the token budget as the real sampler does. The
expected ids are built independently: each turn's tokens, then the tokenization of the rendered
*real* sandbox output, so the checks fail if the driver re-tokenizes, drops or mis-masks anything.
"""
import time

import pytest

from minir1ci.env import prompts
from minir1ci.inference.engine import SamplingParams
from minir1ci.env.interpreter import RolloutParams, run_rollouts
from minir1ci.presets import tiny_dir
from minir1ci.env.sandbox import Sandbox
from minir1ci.inference.tokenizer import Tokenizer


class _Seq:
    def __init__(self, sid, prompt, params, turns, eos):
        self.sid, self.prompt, self.params = sid, prompt, params
        self.queue = [t for turn in turns for t in turn] + [eos]   # what the "model" will say, in order
        self.turn_ends = set()
        pos = 0
        for turn in turns:
            pos += len(turn)
            self.turn_ends.add(pos)
        self.tokens, self.mask, self.logp = [], [], []
        self.segment = []
        self.said = 0
        self.finish, self.stop_reason, self.paused = None, None, False


class ScriptedSampler:
    """Emits scripted turns; a turn boundary is where the script waits for appended output."""

    def __init__(self, tokenizer, turns_per_request):
        self.tok, self.scripts, self.seqs, self.next_id = tokenizer, list(turns_per_request), {}, 0
        self.steps, self.appended_at = 0, []   # (step count, seq id) of each append_tokens

    def add_request(self, prompt_ids, params: SamplingParams) -> int:
        turns = [self.tok.encode(t) for t in self.scripts[self.next_id]]
        s = _Seq(self.next_id, prompt_ids, params, turns, self.tok.eos_token_id)
        self.seqs[s.sid] = s
        self.next_id += 1
        return s.sid

    def has_unfinished(self) -> bool:
        return any(s.finish is None and not s.paused for s in self.seqs.values())

    def step(self):
        self.steps += 1
        events = []
        for s in list(self.seqs.values()):
            if s.finish is not None or s.paused:
                continue
            tok = s.queue[s.said]
            s.said += 1
            s.tokens.append(tok), s.mask.append(1), s.logp.append(-0.5)
            s.segment.append(tok)
            p = s.params
            if tok in p.stop_token_ids:
                s.finish, s.stop_reason = "stop", tok
            elif p.stop_fn is not None and (why := p.stop_fn(s.segment)):
                s.finish, s.stop_reason, s.paused = "stop", why, True
            elif len(s.tokens) >= p.max_new_tokens:
                s.finish = "length"
            if s.finish is not None:
                events.append(self.result(s.sid))
        return events

    def result(self, sid):
        from minir1ci.inference.engine import Completion
        s = self.seqs[sid]
        return Completion(sid, list(s.prompt), list(s.tokens), list(s.logp), list(s.logp), list(s.mask),
                          s.finish, s.stop_reason)

    def append_tokens(self, sid, ids):
        self.appended_at.append((self.steps, sid))
        s = self.seqs[sid]
        s.tokens += ids
        s.mask += [0] * len(ids)
        s.logp += [0.0] * len(ids)
        s.segment, s.finish, s.stop_reason, s.paused = [], None, None, False

    def release(self, sid):
        self.seqs[sid].paused = False
        return self.result(sid)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(tiny_dir())


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(timeout=2.0) as sb:
        yield sb


def block(code: str) -> str:
    return f"Let me compute.\n```python\n{code}\n```"


def rollout(tok, sandbox, turns, **kw):
    params = RolloutParams(**{"temperature": 1.0, "max_new_tokens": 2000, **kw})
    sampler = ScriptedSampler(tok, [turns])
    [tr] = run_rollouts(None, tok, sandbox, [[1, 2, 3]], 1, params, sampler=sampler)
    return tr


def expected(tok, sandbox, turns, executed=None):
    """ids and mask built independently: turn tokens (mask 1), then the tokenization of the
    rendered *real* output of each executed block (mask 0)."""
    ids, mask = [], []
    executed = len(turns) - 1 if executed is None else executed
    for i, turn in enumerate(turns):
        t = tok.encode(turn)
        ids += t
        mask += [1] * len(t)
        if i < executed:
            res = sandbox.run(prompts.pending_code(turn))
            out = tok.encode(prompts.render_output(res.stdout, res.stderr, res.status))
            ids += out
            mask += [0] * len(out)
    return ids, mask


def test_no_code_answer_in_text(tok, sandbox):
    turns = ["The sum is 5, so <<<5>>>"]
    tr = rollout(tok, sandbox, turns)
    ids, mask = expected(tok, sandbox, turns)
    assert tr.response_ids == ids and tr.loss_mask == mask
    assert tr.finish_reason == "answer" and tr.num_code_calls == 0 and tr.turns == turns


def test_one_block_then_answer_keeps_eos_in_the_mask(tok, sandbox):
    turns = [block("print(6 * 7)"), "\nSo the answer is 42."]
    tr = rollout(tok, sandbox, turns, stop_at_answer=False)
    ids, mask = expected(tok, sandbox, turns)
    assert tr.response_ids == ids + [tok.eos_token_id]
    assert tr.loss_mask == mask + [1]                    # the sampled eos is trained on
    assert tr.finish_reason == "eos" and tr.num_code_calls == 1
    assert tr.code_blocks[0]["stdout"] == "42\n" and tr.code_blocks[0]["status"] == "ok"
    assert "Code Execution Results:\n42\n" in tr.text
    assert len(tr.logprobs) == len(tr.response_ids)
    assert all(lp == 0.0 for lp, m in zip(tr.logprobs, tr.loss_mask) if not m)


def test_several_blocks_and_an_error(tok, sandbox):
    turns = [block("x = 3\nprint(x)"), block("print(undefined_name)"), block("print(2 ** 10)"), " <<<1024>>>"]
    tr = rollout(tok, sandbox, turns)
    ids, mask = expected(tok, sandbox, turns)
    assert tr.response_ids == ids and tr.loss_mask == mask
    assert tr.num_code_calls == 3 and tr.finish_reason == "answer"
    assert tr.code_blocks[1]["status"] == "error" and "NameError" in tr.code_blocks[1]["stderr"]
    assert "NameError" in tr.text                         # the traceback is shown to the model


def test_timeout_is_reported_and_generation_continues(tok, sandbox):
    turns = [block("while True: pass"), " <<<none>>>"]
    tr = rollout(tok, sandbox, turns)
    assert tr.code_blocks[0]["status"] == "timeout"
    assert "timed out" in tr.text and tr.finish_reason == "answer"
    assert tr.loss_mask.count(0) > 0 and tr.turns == turns


def test_megabytes_of_output_are_cut_to_the_token_budget(tok, sandbox):
    turns = [block("print('ab' * 2_000_000)"), " <<<done>>>"]
    tr = rollout(tok, sandbox, turns, max_output_tokens=64)
    inserted = [t for t, m in zip(tr.response_ids, tr.loss_mask) if m == 0]
    assert 0 < len(inserted) <= 64
    text = tok.decode(inserted)
    assert inserted == tok.encode(text)                    # a plain tokenization of what is shown
    assert text.startswith(f"\n{prompts.OUTPUT_HEADER}\nabab") and text.endswith("ab\n\n")
    assert prompts.TRUNCATION_MARKER.strip() in text
    sampled = [t for t, m in zip(tr.response_ids, tr.loss_mask) if m == 1]
    assert sampled == tok.encode(turns[0]) + tok.encode(turns[1])
    k = len(tok.encode(turns[0]))                          # the output sits right after the block
    assert tr.loss_mask == [1] * k + [0] * len(inserted) + [1] * len(tok.encode(turns[1]))


def test_unclosed_block_stops_at_the_token_budget(tok, sandbox):
    turns = ["```python\n" + "x = 1\n" * 200]
    tr = rollout(tok, sandbox, turns, max_new_tokens=50)
    assert tr.finish_reason == "length" and len(tr.response_ids) == 50
    assert tr.num_code_calls == 0 and all(tr.loss_mask)


def test_code_call_cap_ends_the_trajectory(tok, sandbox):
    turns = [block(f"print({i})") for i in range(4)] + [" <<<3>>>"]
    tr = rollout(tok, sandbox, turns, max_code_calls=2)
    assert tr.num_code_calls == 2 and tr.finish_reason == "max_code_calls"
    ids, mask = expected(tok, sandbox, turns[:3], executed=2)
    assert tr.response_ids == ids and tr.loss_mask == mask


def test_text_only_mode_never_executes(tok, sandbox):
    turns = [block("print(1)") + " and so <<<1>>>"]
    tr = rollout(tok, sandbox, turns, use_code=False)
    assert tr.num_code_calls == 0 and all(tr.loss_mask) and tr.finish_reason == "answer"


def test_groups_are_consecutive_and_independent(tok, sandbox):
    scripts = [[block("print(1)"), " <<<1>>>"], ["<<<2>>>"], [block("print(3)"), " <<<3>>>"], ["<<<4>>>"]]
    sampler = ScriptedSampler(tok, scripts)
    trajs = run_rollouts(None, tok, sandbox, [[1], [2]], 2, RolloutParams(), sampler=sampler)
    assert [t.num_code_calls for t in trajs] == [1, 0, 1, 0]
    assert [prompts.extract_answer(t.text) for t in trajs] == ["1", "2", "3", "4"]
    assert [t.prompt_ids for t in trajs] == [[1], [1], [2], [2]]


class SlowSandbox:
    """The sandbox's results, `delay` seconds late."""

    def __init__(self, sandbox, delay):
        self.sandbox, self.delay = sandbox, delay

    def run_many(self, codes, session_ids=None):
        time.sleep(self.delay)
        return self.sandbox.run_many(codes, session_ids=session_ids)


def test_outputs_are_appended_one_step_later_however_long_the_code_runs(tok, sandbox):
    """The blocks of a step run while the sampler takes its next step; their outputs are appended after
    that step whether the sandbox answered at once or long after: the same schedule and trajectories."""
    scripts = [[block("print(1)"), block("print(11)"), " <<<1>>>"], ["<<<2>>>"], [block("print(3)"), " <<<3>>>"],
               ["The answer is", " <<<4>>>"]]
    runs = []
    for delay in (0.0, 0.3):
        sampler = ScriptedSampler(tok, scripts)
        trajs = run_rollouts(None, tok, SlowSandbox(sandbox, delay), [[1], [2]], 2, RolloutParams(), sampler=sampler)
        runs.append((sampler.appended_at, [(t.response_ids, t.loss_mask) for t in trajs]))
    assert runs[0] == runs[1]
    first_pause = len(tok.encode(block("print(1)")))                   # the step that closes the first block
    assert runs[0][0][0] == (first_pause + 1, 0)


def test_stateful_code_shares_a_trajectorys_blocks_and_nothing_else(tok, sandbox):
    turns = [block("x = 6"), block("print(x * 7)"), " <<<42>>>"]
    stateless = rollout(tok, sandbox, turns)
    assert stateless.code_blocks[1]["status"] == "error" and "NameError" in stateless.code_blocks[1]["stderr"]
    sampler = ScriptedSampler(tok, [turns, [block("print(x)"), " <<<1>>>"]])
    params = RolloutParams(temperature=1.0, max_new_tokens=2000, stateful_code=True)
    first, other = run_rollouts(None, tok, sandbox, [[1], [2]], 1, params, sampler=sampler)
    assert first.code_blocks[1]["stdout"] == "42\n"                          # the second block sees x
    assert "NameError" in other.code_blocks[0]["stderr"]                     # another trajectory does not


def test_only_the_models_own_turns_are_scored(tok, sandbox):
    """Inserted interpreter output never answers for the model (evaluate.py's summary, rollout.py and
    training all score `model_text`): a program that prints <<<42>>> before the model stops without an
    answer scores 0, and an unclosed <<< in the output does not swallow the model's own answer."""
    from minir1ci.env.evaluation import summarize
    from minir1ci.env.tasks import Example

    ex = Example(id="q", task="t:x", prompt="?", answer="42")
    printed = rollout(tok, sandbox, [block("print('<' * 3 + '42' + '>' * 3)"), " Done."])
    swallowed = rollout(tok, sandbox, [block("print('<' * 3 + 'x')"), " So <<<42>>>"])
    assert summarize([ex], [printed], 1)["average"]["accuracy"] == 0.0
    assert summarize([ex], [swallowed], 1)["average"]["accuracy"] == 1.0
    assert "<<<42>>>" in printed.text and prompts.extract_answer(printed.model_text) is None
    assert prompts.extract_answer(swallowed.model_text) == "42"


def test_rollout_settings_have_one_default_that_the_config_and_the_flags_read():
    """One path per rollout setting: RolloutParams holds the only defaults; TrainConfig's fields and the
    scripts' flags start from them, and `rollout_params` builds the params from either."""
    from minir1ci import cli
    from minir1ci.config import TrainConfig, resolve
    from minir1ci.env.interpreter import rollout_params

    settings = ("temperature", "top_p", "max_new_tokens", "max_code_calls", "exec_timeout", "use_code",
                "stateful_code")
    cfg, defaults = TrainConfig(stage="grpo"), RolloutParams()
    assert all(getattr(cfg, k) == getattr(defaults, k) for k in settings)
    ap = cli.ArgumentParser(prog="test")
    cli.add_rollout_args(ap, n=1, temperature=0.6)
    args = ap.parse_args([])
    assert all(getattr(args, k) == getattr(defaults, k) for k in settings if k != "temperature")
    cfg = resolve(["--stage=grpo", "--temperature=0.7", "--top_p=0.9", "--max_new_tokens=77", "--max_code_calls=3",
                   "--exec_timeout=4", "--use_code=false", "--stateful_code"])
    assert rollout_params(cfg, seed=5) == RolloutParams(
        temperature=0.7, top_p=0.9, max_new_tokens=77, max_code_calls=3, exec_timeout=4.0, use_code=False,
        stateful_code=True, seed=5)
    args = ap.parse_args(["--temperature=0.2", "--no-interpreter", "--exec_timeout=3", "--seed=9", "--stateful_code"])
    assert rollout_params(args, seed=args.seed) == RolloutParams(
        temperature=0.2, top_p=1.0, max_new_tokens=1024, max_code_calls=8, exec_timeout=3.0, use_code=False,
        stateful_code=True, seed=9)
    assert all(a.help for a in ap._actions)                      # every flag says what it does
