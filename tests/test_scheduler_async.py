"""Asynchronous scheduling: step N+1 is scheduled and launched before step N's tokens come back.

The fake model of test_scheduler_policy (it reads its context back from a simulated paged KV cache) runs each
step at launch; a placeholder input is replaced by the token the previous launch sampled, as the runner does on
the device. Reference: the same requests run alone, so every output must equal the synchronous engine's.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings

from moeserve.request import PLACEHOLDER, Request, RequestStatus
from moeserve.sampling_params import SamplingParams
from moeserve.scheduler.output import ModelOutput, SchedulerOutput
from moeserve.scheduler.scheduler import Scheduler
from tests.test_scheduler_policy import (
    FakeModel,
    assert_matches_reference,
    check_all_released,
    check_invariants,
    make_requests,
    new_scheduler,
    next_token,
    random_configs,
    random_workload,
)


class AsyncFakeModel(FakeModel):
    """FakeModel whose placeholder inputs take the token sampled for that request by the previous launch."""

    def __init__(self, sched: Scheduler, vocab: int = 1000) -> None:
        super().__init__(sched, vocab)
        self.last_sampled: dict[str, int] = {}
        self.num_placeholder_inputs = 0

    def execute(self, out: SchedulerOutput) -> ModelOutput:
        for r in out.requests:
            if PLACEHOLDER in r.token_ids:
                assert r.token_ids == [PLACEHOLDER] and r.sample, "only a lone decode input is in flight"
                r.token_ids = [self.last_sampled[r.request_id]]
                self.num_placeholder_inputs += 1
        result = super().execute(out)
        self.last_sampled = {rid: tokens[0] for rid, tokens in result.sampled.items()}
        return result


def drive_async(
    sched: Scheduler, arrivals: dict[int, list[Request]], vocab: int = 1000, aborts: dict[int, str] | None = None,
    model: AsyncFakeModel | None = None,
) -> AsyncFakeModel:
    """Launch step s, then apply step s-1's results; aborts[s], then arrivals[s], happen before step s."""
    model = model or AsyncFakeModel(sched, vocab)
    in_flight: tuple[SchedulerOutput, ModelOutput] | None = None
    step = 0
    while sched.has_unfinished() or in_flight is not None or any(k >= step for k in arrivals):
        if aborts and step in aborts:
            sched.abort(aborts[step])
        for req in arrivals.get(step, []):
            sched.add_request(req)
        out = sched.schedule()
        check_invariants(sched, out)
        launched = (out, model.execute(out)) if out.requests else None
        if in_flight is not None:
            sched.update(*in_flight)
        in_flight = launched
        step += 1
        assert step < 20_000, "no progress"
    check_all_released(sched)
    return model


def test_async_matches_running_alone_and_pipelines_decodes():
    requests = make_requests(random.Random(1), 64)
    sched = new_scheduler(max_num_seqs=16)
    model = drive_async(sched, {0: requests})
    assert_matches_reference(requests, sched)
    assert model.num_placeholder_inputs > 500  # decodes really ran one step ahead of their results


def test_async_with_a_tiny_kv_pool_preempts_requests_in_flight():
    requests = make_requests(random.Random(3), 64)
    sched = new_scheduler(num_blocks=40)
    drive_async(sched, {0: requests})
    assert_matches_reference(requests, sched)
    assert sched.stats()["num_preemptions"] > 0


def test_no_step_is_wasted_on_a_known_last_token():
    # max_tokens is known when scheduling: the request is not scheduled past it (eos is only known later).
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    sched = new_scheduler()
    model = AsyncFakeModel(sched)
    sched.add_request(req)
    launches = []
    in_flight = None
    while sched.has_unfinished() or in_flight is not None:
        out = sched.schedule()
        launched = (out, model.execute(out)) if out.requests else None
        launches += [len(out.requests)]
        if in_flight is not None:
            sched.update(*in_flight)
        in_flight = launched
    assert launches[:3] == [1, 1, 1] and sum(launches) == 3  # prefill + 2 decodes; nothing after
    assert len(req.output_token_ids) == 3 and req.num_placeholders == 0


def test_abort_in_flight_and_reuse_of_the_id():
    first = Request("same", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    second = Request("same", [8, 9], SamplingParams(max_tokens=4, ignore_eos=True))
    other = Request("other", [1, 2, 3, 4], SamplingParams(max_tokens=6, ignore_eos=True))
    sched = new_scheduler()
    drive_async(sched, {0: [first, other], 4: [second]}, aborts={4: "same"})
    assert first.status is RequestStatus.FINISHED and first.finish_reason == "abort"
    assert first.num_placeholders == 0 and 1 <= len(first.output_token_ids) < 50
    # The aborted request's last token in flight never lands on the new request with the same id.
    assert_matches_reference([second, other], sched)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@random_configs
def test_async_random_configs_match_running_alone(seed, block_size, budget, max_num_seqs, num_blocks, caching):
    vocab = 11  # a small vocabulary: eos and stop tokens end requests early
    sched, requests, arrivals = random_workload(seed, vocab, block_size, budget, max_num_seqs, num_blocks, caching)
    drive_async(sched, arrivals, vocab)
    assert_matches_reference(requests, sched, vocab)


class _PerRequestModel(AsyncFakeModel):
    """Requests with the same context sample different tokens (as seeded sampling does): the salt of a
    request is the number in its id."""

    def execute(self, out: SchedulerOutput) -> ModelOutput:
        result = super().execute(out)
        for rid, tokens in result.sampled.items():
            tokens[0] = (tokens[0] + int(rid[1:])) % self.vocab
        self.last_sampled = {rid: tokens[0] for rid, tokens in result.sampled.items()}
        return result


def test_tokens_still_in_flight_never_enter_the_prefix_cache():
    """Two equal prompts one token short of a block, decoded a step ahead of their results: the block their
    first sampled token completes is cached under that token, never under the placeholder, so the second
    request does not take the first one's block (its KV holds the other request's token)."""
    prompt = list(range(100, 115))  # 15 tokens, block size 16
    requests = [Request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
                for i in (1, 2)]
    sched = new_scheduler()
    drive_async(sched, {0: requests}, model=_PerRequestModel(sched))
    assert not any(PLACEHOLDER in key for key in sched.kv_cache.prefix_cache.cached_prefixes())
    for req in requests:  # each request's own context, as if it ran alone
        seq, want = list(prompt), []
        for _ in range(20):
            want.append((next_token(seq) + int(req.request_id[1:])) % 1000)
            seq.append(want[-1])
        assert req.output_token_ids == want, req.request_id
