"""The scheduler driven by a deterministic fake model that reads its context back from a simulated paged KV
cache: any wrong block table, position, chunk, prefix hit, eviction or preemption changes the tokens.

Reference: a request run alone, i.e. next token = hash of the whole sequence so far, until a stop condition.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeserve.request import Request, RequestStatus
from moeserve.sampling_params import SamplingParams
from moeserve.scheduler.output import ModelOutput, SchedulerOutput
from moeserve.scheduler.scheduler import Scheduler

VOCAB = 1000
EOS = 999


def next_token(seq: list[int], vocab: int = VOCAB) -> int:
    h = 7
    for t in seq:
        h = (h * 1_000_003 + t + 1) % (2**61 - 1)
    return h % vocab


def reference(req: Request, context_limit: int, vocab: int = VOCAB) -> tuple[list[int], str, int | None]:
    """Tokens, finish_reason and stop_reason of req run alone."""
    params, seq, out = req.sampling_params, list(req.prompt_token_ids), []
    while True:
        t = next_token(seq, vocab)
        out.append(t)
        seq.append(t)
        if not params.ignore_eos and t in req.eos_token_ids:
            return out, "stop", None
        if t in params.stop_token_ids:
            return out, "stop", t
        if len(out) >= params.max_tokens or len(seq) >= context_limit:
            return out, "length", None


class FakeModel:
    """Writes (position, token) into KV slots and samples from what it reads back through block tables."""

    def __init__(self, sched: Scheduler, vocab: int = VOCAB) -> None:
        self.sched, self.vocab, self.bs = sched, vocab, sched.block_size
        self.slots: dict[int, tuple[int, int]] = {}

    def execute(self, out: SchedulerOutput) -> ModelOutput:
        pool, cache = self.sched.kv_cache.pool, self.sched.kv_cache.prefix_cache
        sampled = {}
        for r in out.requests:
            assert len(r.block_ids) * self.bs >= r.start_position + len(r.token_ids)
            for k, tok in enumerate(r.token_ids):
                pos = r.start_position + k
                block = r.block_ids[pos // self.bs]
                # Only the request's own, not yet cached blocks are ever written.
                assert pool.ref_count(block) == 1 and (cache is None or block not in cache)
                self.slots[block * self.bs + pos % self.bs] = (pos, tok)
            if r.sample:
                n = r.start_position + len(r.token_ids)
                context = [self._read(r.block_ids, p) for p in range(n)]
                sampled[r.request_id] = [next_token(context, self.vocab)]
        return ModelOutput(sampled=sampled)

    def _read(self, table: list[int], pos: int) -> int:
        stored_pos, tok = self.slots[table[pos // self.bs] * self.bs + pos % self.bs]
        assert stored_pos == pos, "KV slot holds another position: a block table is wrong"
        return tok


def check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    kv = sched.kv_cache
    assert out.num_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    assert len({r.request_id for r in out.requests}) == len(out.requests)
    owners: Counter[int] = Counter(b for r in sched.running for b in r.block_ids)
    for r in sched.waiting:
        assert not r.block_ids
    for b in range(kv.num_blocks):
        cached = kv.prefix_cache is not None and b in kv.prefix_cache
        if owners[b] > 1:
            assert cached, f"block {b} is owned by {owners[b]} requests but is not a shared cached block"
        assert kv.pool.ref_count(b) == owners[b] + cached


def check_all_released(sched: Scheduler) -> None:
    kv = sched.kv_cache
    assert not sched.running and not sched.waiting and kv.usage == 0.0
    assert kv.pool.num_free + kv.num_cached_blocks == kv.num_blocks
    if kv.prefix_cache is not None:
        assert kv.prefix_cache.num_evictable_blocks == kv.num_cached_blocks


def drive(
    sched: Scheduler, arrivals: dict[int, list[Request]], vocab: int = VOCAB, model: FakeModel | None = None
) -> list[SchedulerOutput]:
    """Run until every request finished; arrivals[s] are added before step s. Returns every step's output."""
    model = model or FakeModel(sched, vocab)
    steps: list[SchedulerOutput] = []
    step = 0
    while sched.has_unfinished() or any(k >= step for k in arrivals):
        for req in arrivals.get(step, []):
            sched.add_request(req)
        out = sched.schedule()
        check_invariants(sched, out)
        changed = sched.update(out, model.execute(out))
        assert {r.request_id for r in changed} == {r.request_id for r in out.requests if r.sample}
        steps.append(out)
        step += 1
        assert step < 20_000, "no progress"
    check_all_released(sched)
    return steps


def assert_matches_reference(requests: list[Request], sched: Scheduler, vocab: int = VOCAB) -> None:
    for req in requests:
        tokens, reason, stop_reason = reference(req, sched.context_limit, vocab)
        assert req.output_token_ids == tokens, req.request_id
        assert req.status is RequestStatus.FINISHED
        assert (req.finish_reason, req.stop_reason) == (reason, stop_reason)


def make_requests(rng: random.Random, n: int, max_prompt: int = 300, max_tokens: int = 40) -> list[Request]:
    shared = [[rng.randrange(VOCAB) for _ in range(rng.randint(20, 120))] for _ in range(3)]
    out = []
    for i in range(n):
        prompt = list(rng.choice(shared)) if i % 2 else []
        prompt += [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_prompt - len(prompt)))]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, max_tokens))
        out.append(Request(f"r{i}", prompt, params, eos_token_ids=frozenset({EOS})))
    return out


def new_scheduler(**overrides) -> Scheduler:
    kwargs = dict(
        max_num_batched_tokens=256, max_num_seqs=32, max_model_len=4096, block_size=16, num_blocks=1024
    )
    kwargs.update(overrides)
    return Scheduler(**kwargs)


# ---- batching invariance ------------------------------------------------------------------------------
def test_requests_submitted_together_match_running_alone():
    requests = make_requests(random.Random(1), 64)
    sched = new_scheduler(max_num_seqs=16)
    steps = drive(sched, {0: requests})
    assert_matches_reference(requests, sched)
    assert max(len(s.requests) for s in steps) == 16  # max_num_seqs was reached
    assert max(s.num_tokens for s in steps) == 256  # and the budget was used up
    assert any(not r.sample for s in steps for r in s.requests)  # prompts were chunked by the budget
    assert sched.stats()["prefix_cache_hit_tokens"] > 0


def test_staggered_arrivals_match_running_alone():
    rng = random.Random(2)
    requests = make_requests(rng, 64)
    arrivals: dict[int, list[Request]] = {}
    for req in requests:
        arrivals.setdefault(rng.randrange(120), []).append(req)
    sched = new_scheduler(max_num_batched_tokens=128)
    drive(sched, arrivals)
    assert_matches_reference(requests, sched)


def test_tiny_kv_pool_preempts_and_evicts_without_changing_outputs():
    requests = make_requests(random.Random(3), 64)
    sched = new_scheduler(num_blocks=40)  # 640 tokens of KV for 64 requests of up to 340 tokens
    steps = drive(sched, {0: requests})
    assert_matches_reference(requests, sched)
    stats = sched.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_evicted_blocks"] > 0
    assert sum(r.num_preemptions for r in requests) == stats["num_preemptions"]
    # Every finish and every preemption is announced to the runner (the last finishes ride on a later step).
    dropped = [rid for s in steps for rid in s.dropped_request_ids] + sched._dropped
    assert len(dropped) == 64 + stats["num_preemptions"]


# Scheduler limits drawn by hypothesis; the test gets them as keyword arguments (see random_workload).
random_configs = given(
    seed=st.integers(0, 2**32 - 1),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(3, 64),
    max_num_seqs=st.integers(1, 8),
    num_blocks=st.integers(12, 120),
    caching=st.booleans(),
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@random_configs
def test_random_configs_match_running_alone(seed, block_size, budget, max_num_seqs, num_blocks, caching):
    vocab = 11  # a small vocabulary makes eos and stop tokens common
    sched, requests, arrivals = random_workload(seed, vocab, block_size, budget, max_num_seqs, num_blocks, caching)
    drive(sched, arrivals, vocab)
    assert_matches_reference(requests, sched, vocab)


def random_workload(
    seed: int, vocab: int, block_size: int, budget: int, max_num_seqs: int, num_blocks: int, caching: bool
) -> tuple[Scheduler, list[Request], dict[int, list[Request]]]:
    """A scheduler with these limits and 1-12 requests (shared prefixes, stop tokens, eos) arriving over 10
    steps."""
    rng = random.Random(seed)
    sched = new_scheduler(
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        block_size=block_size,
        num_blocks=num_blocks,
        max_model_len=rng.randint(8, 80),
        enable_prefix_caching=caching,
    )
    shared = [rng.randrange(vocab) for _ in range(20)]
    arrivals: dict[int, list[Request]] = {}
    requests = []
    for i in range(rng.randint(1, 12)):
        prompt = shared[: rng.randint(0, 20)] + [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        prompt = prompt[: sched.context_limit - 1]
        params = SamplingParams(
            max_tokens=rng.randint(1, 12), ignore_eos=rng.random() < 0.3,
            stop_token_ids=rng.sample(range(vocab), rng.randint(0, 1)),
        )
        req = Request(f"r{i}", prompt, params, eos_token_ids=frozenset({0}))
        requests.append(req)
        arrivals.setdefault(rng.randrange(10), []).append(req)
    return sched, requests, arrivals


# ---- chunked prefill and prefix caching ---------------------------------------------------------------
def test_long_prompt_is_chunked_alongside_decodes():
    rng = random.Random(4)
    long = Request("long", [rng.randrange(VOCAB) for _ in range(500)], SamplingParams(max_tokens=5))
    short = Request("short", [1, 2, 3], SamplingParams(max_tokens=30))
    sched = new_scheduler(max_num_batched_tokens=64)
    steps = drive(sched, {0: [short], 2: [long]})
    assert_matches_reference([long, short], sched)
    mine = [r for s in steps for r in s.requests if r.request_id == "long"]
    chunks = [(r.start_position, len(r.token_ids), r.sample) for r in mine]
    prefill = [c for c in chunks if c[0] < 500]
    assert [c[0] for c in prefill] == list(range(0, 500, 63))  # 63 + 1 decode token per step
    assert all(not sample for _, _, sample in prefill[:-1]) and prefill[-1][2]
    assert all(s.num_tokens <= 64 for s in steps)


def test_shared_prefix_reuses_blocks_of_a_finished_request():
    rng = random.Random(5)
    prefix = [rng.randrange(VOCAB) for _ in range(200)]
    first = Request("first", prefix + [1, 2, 3], SamplingParams(max_tokens=4))
    second = Request("second", prefix + [7, 8, 9, 10], SamplingParams(max_tokens=4))
    sched = new_scheduler()
    model = FakeModel(sched)
    steps = drive(sched, {0: [first]}, model=model)
    first_table = [r.block_ids for s in steps for r in s.requests][-1]
    steps = drive(sched, {0: [second]}, model=model)
    assert steps[0].dropped_request_ids == ["first"]
    assert_matches_reference([first, second], sched)
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 192  # 12 full blocks of 16
    assert steps[0].requests[0].start_position == 192
    assert steps[0].requests[0].block_ids[:12] == first_table[:12]
    stats = sched.stats()
    assert stats["prefix_cache_hit_tokens"] == 192
    assert stats["prefix_cache_hit_rate"] == pytest.approx(192 / (203 + 204))


def test_prefix_caching_off_recomputes_everything():
    prefix = list(range(100))
    reqs = [Request(f"r{i}", prefix + [i], SamplingParams(max_tokens=3)) for i in range(2)]
    sched = new_scheduler(enable_prefix_caching=False)
    drive(sched, {0: reqs[:1], 10: reqs[1:]})
    assert_matches_reference(reqs, sched)
    assert reqs[1].num_cached_tokens == 0 and sched.kv_cache.pool.num_free == sched.kv_cache.num_blocks


# ---- preemption policy --------------------------------------------------------------------------------
def test_the_newest_running_request_is_preempted_and_keeps_its_tokens():
    # 6 blocks of 4 tokens: two requests of 9-token prompts fit (3 blocks each) until one of them grows.
    old = Request("old", list(range(9)), SamplingParams(max_tokens=12))
    new = Request("new", list(range(100, 109)), SamplingParams(max_tokens=12))
    sched = new_scheduler(block_size=4, num_blocks=6, enable_prefix_caching=False)
    model = FakeModel(sched)
    sched.add_request(old)
    sched.add_request(new)
    while sched.stats()["num_preemptions"] == 0:
        out = sched.schedule()
        check_invariants(sched, out)
        sched.update(out, model.execute(out))
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0 and not new.block_ids
    assert new.output_token_ids and old.status is RequestStatus.RUNNING
    assert out.dropped_request_ids == ["new"] and [r.request_id for r in out.requests] == ["old"]
    generated = list(new.output_token_ids)
    drive(sched, {}, model=model)
    assert new.output_token_ids[: len(generated)] == generated
    assert_matches_reference([old, new], sched)


# ---- finishing ----------------------------------------------------------------------------------------
def _run_one(req: Request, **overrides) -> Scheduler:
    sched = new_scheduler(**overrides)
    drive(sched, {0: [req]})
    return sched


def test_max_model_len_limits_the_context():
    req = Request("r", list(range(30)), SamplingParams(max_tokens=100))
    _run_one(req, max_model_len=40)
    assert len(req.output_token_ids) == 10 and req.finish_reason == "length"
    # The KV cache is a context limit too: 4 blocks of 16 tokens.
    req = Request("r", list(range(30)), SamplingParams(max_tokens=100))
    _run_one(req, num_blocks=4)
    assert req.num_tokens == 64 and req.finish_reason == "length"


def test_eos_and_stop_tokens_finish_with_the_right_reason():
    prompt = [5, 6, 7]
    expected, _, _ = reference(Request("x", prompt, SamplingParams(max_tokens=10, ignore_eos=True)), 4096)
    eos = frozenset({expected[2]})
    req = Request("eos", prompt, SamplingParams(max_tokens=10), eos_token_ids=eos)
    _run_one(req)
    assert req.output_token_ids == expected[:3] and (req.finish_reason, req.stop_reason) == ("stop", None)
    req = Request("ignore", prompt, SamplingParams(max_tokens=10, ignore_eos=True), eos_token_ids=eos)
    _run_one(req)
    assert req.output_token_ids == expected and (req.finish_reason, req.stop_reason) == ("length", None)
    req = Request("stop_id", prompt, SamplingParams(max_tokens=10, stop_token_ids=[expected[3]]))
    _run_one(req)
    assert req.output_token_ids == expected[:4]
    assert (req.finish_reason, req.stop_reason) == ("stop", expected[3])


def test_finish_request_for_a_stop_string_frees_blocks():
    sched = new_scheduler()
    model = FakeModel(sched)
    req = Request("r", list(range(40)), SamplingParams(max_tokens=50))
    sched.add_request(req)
    for _ in range(3):
        out = sched.schedule()
        sched.update(out, model.execute(out))
    assert sched.finish_request("r", "stop", "###") is req
    assert (req.status, req.finish_reason, req.stop_reason) == (RequestStatus.FINISHED, "stop", "###")
    assert not sched.has_unfinished() and sched.get_request("r") is None
    check_all_released(sched)
    assert sched.finish_request("r", "stop", "###") is None


def test_abort_frees_blocks_running_waiting_and_in_flight():
    rng = random.Random(6)
    reqs = [Request(f"r{i}", [rng.randrange(VOCAB) for _ in range(40)], SamplingParams(max_tokens=20))
            for i in range(4)]
    sched = new_scheduler(max_num_seqs=2)
    model = FakeModel(sched)
    for req in reqs:
        sched.add_request(req)
    for _ in range(3):
        out = sched.schedule()
        sched.update(out, model.execute(out))
    held = set(reqs[0].block_ids)
    assert sched.abort("r0") is reqs[0] and reqs[0].finish_reason == "abort" and not reqs[0].block_ids
    assert all(sched.kv_cache.pool.ref_count(b) <= 1 for b in held)  # only the prefix cache may keep them
    assert sched.abort("r3").finish_reason == "abort"  # still waiting
    assert sched.abort("r3") is None and sched.abort("nobody") is None
    out = sched.schedule()
    assert out.dropped_request_ids == ["r0"]  # r3 never ran: the runner knows nothing of it
    result = model.execute(out)
    assert sched.abort("r1") is reqs[1]  # aborted while its step is in flight: update skips it
    changed = sched.update(out, result)
    assert reqs[1] not in changed and reqs[1].finish_reason == "abort"
    drive(sched, {}, model=model)
    assert_matches_reference([reqs[2]], sched)
    check_all_released(sched)


def test_add_request_rejects_what_can_never_run():
    sched = new_scheduler(max_model_len=100, num_blocks=4)  # KV holds 64 tokens
    with pytest.raises(ValueError, match="prompt is empty"):
        sched.add_request(Request("a", [], SamplingParams()))
    with pytest.raises(ValueError, match="prompt has 100 tokens; the context limit is 100"):
        sched.add_request(Request("b", [1] * 100, SamplingParams()))
    with pytest.raises(ValueError, match=r"prompt has 64 tokens; the KV cache holds at most 64 tokens \("):
        sched.add_request(Request("c", [1] * 64, SamplingParams()))
    sched.add_request(Request("d", [1] * 63, SamplingParams()))
    with pytest.raises(ValueError, match="request id 'd' is already in use"):
        sched.add_request(Request("d", [1], SamplingParams()))
    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1, got 0"):
        new_scheduler(max_num_seqs=0)


def test_logprobs_are_kept_per_output_token():
    from moeserve.scheduler.output import TokenLogprobs

    sched = new_scheduler()
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=3, logprobs=1))
    sched.add_request(req)
    while sched.has_unfinished():
        out = sched.schedule()
        tok = 10 + req.num_output_tokens
        lp = TokenLogprobs(tok, -0.5, [(tok, -0.5)])
        sched.update(out, ModelOutput(sampled={"r": [tok]}, logprobs={"r": [lp]}))
    assert req.output_token_ids == [10, 11, 12]
    assert [lp.token_id for lp in req.output_logprobs] == [10, 11, 12]
