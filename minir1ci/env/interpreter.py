"""Code-interpreter rollouts: generate, execute each closed python block, insert its output, go on.

All prompts x n samples decode in one batched sampler. A sequence pauses when its turn closes a
```python block; the paused blocks run concurrently in the sandbox, and each rendered output is
appended as forced tokens that the sampler prefills before decoding resumes, so the response is the
sampler's own ids interleaved with the outputs' (nothing is re-tokenized). The blocks of one step run
while the sampler takes the next step, and their outputs are appended after it, however long either
takes: the schedule, and so every result, does not depend on timing. A trajectory ends on
eos, an <<<answer>>>, a block past the code-call cap (paper v2: 8) or the token budget.
`use_code=False` runs the same prompts without execution (the text-versus-code comparison).

Simplified: one python block per turn (a turn with two runs the last); a block whose output would
overflow the token budget ends the trajectory instead.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count, groupby

from minir1ci.env import prompts
from minir1ci.inference.engine import Sampler, SamplingParams


@dataclass(frozen=True)
class RolloutParams:
    """Every setting of a rollout, the sampler's and the interpreter's; these defaults are the only
    ones (TrainConfig's fields and the scripts' flags read them). `rollout_params` builds it."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024      # the whole response: sampled and inserted tokens
    max_code_calls: int = 8
    max_output_tokens: int = 256    # budget of one inserted interpreter output
    exec_timeout: float = 10.0      # seconds per code block: the timeout of the Sandbox the caller opens
    use_code: bool = True
    stateful_code: bool = False     # a trajectory's blocks share one session (Sandbox replays the earlier ones)
    stop_at_answer: bool = True     # end as soon as a turn holds <<<answer>>>
    seed: int = 0


def rollout_params(opts, seed: int) -> RolloutParams:
    """The rollout settings of a TrainConfig or of rollout.py's and evaluate.py's parsed flags."""
    return RolloutParams(temperature=opts.temperature, top_p=opts.top_p, max_new_tokens=opts.max_new_tokens,
                         max_code_calls=opts.max_code_calls, exec_timeout=opts.exec_timeout, use_code=opts.use_code,
                         stateful_code=opts.stateful_code, seed=seed)


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)     # 1 = sampled (the eos too), 0 = inserted output
    logprobs: list[float] = field(default_factory=list)    # the sampler's, 0 on inserted tokens
    code_blocks: list[dict] = field(default_factory=list)  # each block's code and result
    turns: list[str] = field(default_factory=list)         # the model's turns, as text
    num_code_calls: int = 0
    finish_reason: str = ""                                # eos | answer | max_code_calls | length
    text: str = ""                                         # the decoded response, inserted output included

    @property
    def model_text(self) -> str:
        """What the model wrote, without inserted interpreter output: the text a task scores (a
        program that prints <<<x>>> must not answer for the model)."""
        return "\n".join(self.turns)


def prompt_ids(tokenizer, examples, use_code: bool) -> list[list[int]]:
    """Each example's chat prompt (system + user turn + the assistant header), as token ids."""
    return [tokenizer.apply_chat_template(ex.messages(use_code), add_generation_prompt=True) for ex in examples]


def turn_end(text: str, use_code: bool, stop_at_answer: bool) -> str | None:
    """Why a model turn ends with `text`: "answer", "code" (a block just closed), or None (it goes on)."""
    if stop_at_answer and prompts.extract_answer(text) is not None:
        return "answer"
    if use_code and prompts.pending_code(text) is not None:
        return "code"
    return None


def make_stop_fn(tokenizer, use_code: bool, stop_at_answer: bool):
    """stop_fn(segment_ids) -> `turn_end`'s reason ("answer", "code") or None; the sampler stops on a
    reason and hands it back as the Completion's stop_reason. Every step decodes only the last few
    tokens; the full decode runs when a fence or `>>>` may have just appeared."""
    def stop(segment_ids: list[int]) -> str | None:
        tail = tokenizer.decode(segment_ids[-4:])
        if "```" not in tail and ">>>" not in tail:
            return None
        return turn_end(tokenizer.decode(segment_ids), use_code, stop_at_answer)
    return stop


def render_for_model(tokenizer, result, max_tokens: int) -> list[int]:
    """The token ids inserted after a block: the rendered result, its body cut to `max_tokens`.
    The cut is made on text (head and tail around a marker), then tokenized once, so the ids are
    exactly the tokenization of what is shown."""
    text = prompts.render_output(result.stdout, result.stderr, result.status)
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return ids
    body = text[len(f"\n{prompts.OUTPUT_HEADER}\n"):-2]
    body_ids = tokenizer.encode(body)
    keep = max(max_tokens - 32, 8)          # room for the header, marker and the re-tokenized seams
    head = tokenizer.decode(body_ids[:keep // 2])
    tail = tokenizer.decode(body_ids[-(keep - keep // 2):])
    cut = head + prompts.TRUNCATION_MARKER + tail
    return tokenizer.encode(f"\n{prompts.OUTPUT_HEADER}\n{cut}\n\n")


_CALLS = count()   # stateful sessions are named per call, so concurrent callers never share one


def run_rollouts(model, tokenizer, sandbox, prompt_ids: list[list[int]], n: int, params: RolloutParams,
                 progress=None, sampler: Sampler | None = None, on_finish=None) -> list[Trajectory]:
    """n trajectories per prompt, grouped consecutively: [p0 s0, p0 s1, ..., p1 s0, ...].
    `on_finish(index, trajectory)` is called as each one ends (rollout.py writes it out then)."""
    sampler = sampler or Sampler(model, tokenizer)
    stop_ids = tuple(sorted({tokenizer.eos_token_id, tokenizer.endoftext_id}))
    stop_fn = make_stop_fn(tokenizer, params.use_code, params.stop_at_answer)
    trajs: list[Trajectory] = []
    seq_of: dict[int, int] = {}
    session = f"rollouts{next(_CALLS)}:" if params.stateful_code else None   # + trajectory index
    for p in prompt_ids:
        for _ in range(n):
            sp = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                max_new_tokens=params.max_new_tokens, stop_token_ids=stop_ids,
                                seed=params.seed * 1_000_003 + len(trajs), stop_fn=stop_fn)
            seq_of[sampler.add_request(list(p), sp)] = len(trajs)
            trajs.append(Trajectory(prompt_ids=list(p)))
    done = 0

    def finish(sid: int, c, reason: str) -> None:
        nonlocal done
        tr = trajs[seq_of[sid]]
        _finish(tr, c, reason, tokenizer, params.temperature)
        sampler.release(sid)
        if session:
            sandbox.end_session(session + str(seq_of[sid]))
        done += 1
        if on_finish:
            on_finish(seq_of[sid], tr)
        if progress:
            progress(done, len(trajs))

    def pauses(events) -> list[tuple[int, str]]:
        """(seq_id, code) of the sequences of a step's events that paused on a block; the others finish."""
        paused = []
        for c in events:
            reason = "eos" if c.finish_reason == "stop" else c.finish_reason   # an end-of-turn / eos token
            if c.stop_reason == "code":                                         # our stop_fn: a block closed
                if trajs[seq_of[c.seq_id]].num_code_calls < params.max_code_calls:
                    paused.append((c.seq_id, prompts.pending_code(tokenizer.decode(_last_segment(c)))))
                    continue
                reason = "max_code_calls"
            elif c.stop_reason == "answer":                                     # our stop_fn: <<<answer>>>
                reason = "answer"
            finish(c.seq_id, c, reason)
        return paused

    def resume(paused, results) -> None:
        for (sid, code), res in zip(paused, results):
            tr = trajs[seq_of[sid]]
            tr.num_code_calls += 1
            tr.code_blocks.append({"code": code, "stdout": res.stdout, "stderr": res.stderr,
                                   "status": res.status, "truncated": res.truncated})
            ids = render_for_model(tokenizer, res, params.max_output_tokens)
            c = sampler.result(sid)
            if len(c.token_ids) + len(ids) >= params.max_new_tokens:
                finish(sid, c, "length")
            else:
                sampler.append_tokens(sid, ids)

    running = None   # (paused, their results' Future): executing while the sampler takes one more step
    with ThreadPoolExecutor(1) as pool:
        while sampler.has_unfinished() or running:
            events = sampler.step()
            if running:
                resume(running[0], running[1].result())
                running = None
            paused = pauses(events)
            if paused:
                sessions = [session + str(seq_of[sid]) for sid, _ in paused] if session else None
                running = paused, pool.submit(sandbox.run_many, [code for _, code in paused], session_ids=sessions)
    return trajs


def _last_segment(c) -> list[int]:
    """The tokens sampled since the last inserted output (the current model turn)."""
    k = len(c.mask)
    while k > 0 and c.mask[k - 1] == 1:
        k -= 1
    return c.token_ids[k:]


def _finish(tr: Trajectory, c, reason: str, tokenizer, temperature: float) -> None:
    tr.response_ids = list(c.token_ids)
    tr.loss_mask = list(c.mask)
    # Temperature > 0: the log-prob under the distribution actually sampled from (what the trainer
    # recomputes at the same temperature); greedy: the raw model's.
    source = c.sampling_logprobs if temperature > 0 else c.logprobs
    tr.logprobs = [lp if m else 0.0 for lp, m in zip(source, c.mask)]
    tr.finish_reason = reason
    tr.text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # a turn is a run of sampled tokens between inserted outputs
    tr.turns = [tokenizer.decode([tok for tok, _ in run], skip_special_tokens=True)
                for sampled, run in groupby(zip(c.token_ids, c.mask), key=lambda tm: tm[1]) if sampled]

