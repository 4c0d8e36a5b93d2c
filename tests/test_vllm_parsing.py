"""The vLLM backends' pure parts on CPU: prompt-logprob parsing, sampler-logprob parsing, work
splitting, the temperature rule, and the served scorer against a local canned HTTP server.

Output structures mimic vLLM's: `Logprob(logprob, rank, decoded_token)` objects keyed by
int (in-process `RequestOutput`) and JSON objects keyed by str (`vllm serve`). Tests that
need a GPU and vLLM are marked `gpu` and skipped here.
"""

import importlib.util
import itertools
import json
import math
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.rollout import Sampling
from opd.rollout.vllm import needs_processed_logprobs, request_seed, rollout_from_completion, sampled_logprobs
from opd.teacher.hf import score_tokens
from opd.teacher.served import ServedTeacherScorer
from opd.teacher.vllm import check_prompt_logprob_temperature, parse_prompt_logprobs, split_by_tokens
from opd.types import Rollout

HAS_GPU_VLLM = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
gpu = pytest.mark.skipif(not HAS_GPU_VLLM, reason="needs CUDA and vLLM")


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def vllm_rows(logprobs_T_V: torch.Tensor, token_ids: list[int], k: int, http: bool = False) -> list:
    """vLLM prompt logprobs from a table whose row t predicts token_ids[t + 1]: N rows, the first None.

    Like `LogprobsProcessor._make_logprob_dict`: the scored token with its rank, then the
    top-k with ranks 1..k (overwriting the scored token's entry when it is among them).
    """
    rows = [None]
    for t in range(len(token_ids) - 1):
        lp_V, token = logprobs_T_V[t], token_ids[t + 1]
        row = {token: (float(lp_V[token]), 1 + int((lp_V > lp_V[token]).sum()))}
        values, ids = lp_V.topk(k) if k else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        row |= {int(i): (float(v), rank) for rank, (v, i) in enumerate(zip(values, ids), start=1)}
        if http:
            rows.append({str(i): {"logprob": max(v, -9999.0), "rank": r, "decoded_token": "x"}
                         for i, (v, r) in row.items()})
        else:
            rows.append({i: Logprob(v, r, "x") for i, (v, r) in row.items()})
    return rows


def fake_table(token_ids: list[int], vocab: int = 16) -> torch.Tensor:
    """A deterministic teacher: row t is a log-softmax depending on t and the prefix's last token."""
    t = torch.arange(len(token_ids) - 1, dtype=torch.float32)[:, None]
    v = torch.arange(vocab, dtype=torch.float32)[None, :]
    last = torch.tensor(token_ids[:-1], dtype=torch.float32)[:, None]
    return torch.log_softmax(3 * torch.sin(1.3 * t + 0.7 * v + 0.31 * last * v), dim=-1)


def expected_scores(token_ids: list[int], prompt_len: int, k: int):
    lp_T_V = fake_table(token_ids)
    span = slice(prompt_len - 1, len(token_ids) - 1)  # opd/teacher/hf.py's cut
    targets = torch.tensor(token_ids[1:])[span]
    values, ids = lp_T_V[span].topk(k)
    return lp_T_V[span].gather(-1, targets[:, None]).squeeze(-1), ids, values


# ---- parse_prompt_logprobs ---------------------------------------------------------------------------------------


def test_both_layouts_and_both_styles_agree_and_cut_the_completion_span():
    token_ids, prompt_len, k = [3, 7, 1, 4, 9, 2, 5], 3, 3
    lp_T_V = fake_table(token_ids)
    results = [parse_prompt_logprobs(rows, token_ids, prompt_len, k)
               for http in (False, True) for rows in (vllm_rows(lp_T_V, token_ids, k, http),
                                                       vllm_rows(lp_T_V, token_ids, k, http)[1:])]
    want_lp, want_ids, want_values = expected_scores(token_ids, prompt_len, k)
    for got in results:
        assert got.logprobs_R.shape == (len(token_ids) - prompt_len,)
        torch.testing.assert_close(got.logprobs_R, want_lp)
        assert torch.equal(got.topk_ids_R_K, want_ids)
        torch.testing.assert_close(got.topk_logprobs_R_K, want_values)


def test_alignment_by_position_marks():
    # Target position t gives the scored token logprob -(t + 1): the completion (tokens 4..6)
    # sits at target positions 3..5, exactly hf.py's slice(len(prompt) - 1, len(prompt) - 1 + R).
    token_ids, prompt_len = [10, 11, 12, 13, 14, 15, 16], 4
    rows = [None] + [{token_ids[t + 1]: Logprob(-(t + 1.0), 1)} for t in range(len(token_ids) - 1)]
    got = parse_prompt_logprobs(rows, token_ids, prompt_len, topk=0).logprobs_R
    R = len(token_ids) - prompt_len
    assert got.tolist() == [-(t + 1.0) for t in range(prompt_len - 1, prompt_len - 1 + R)] == [-4.0, -5.0, -6.0]


def test_matches_the_hf_teacher_on_the_tiny_teacher(teacher):
    prompt, completion, k = [1, 40, 41, 42, 43], [50, 51, 52, 2], 4
    seq = prompt + completion
    with torch.no_grad():
        lp_T_V = torch.log_softmax(teacher(torch.tensor([seq])).logits[0, :-1].float(), dim=-1)
    hf = score_tokens(teacher, [prompt], [completion], temperature=1.0, topk=k)[0]
    for rows in (vllm_rows(lp_T_V, seq, k), vllm_rows(lp_T_V, seq, k, http=True)[1:]):
        got = parse_prompt_logprobs(rows, seq, len(prompt), k)
        torch.testing.assert_close(got.logprobs_R, hf.logprobs_R, atol=1e-5, rtol=0)
        assert torch.equal(got.topk_ids_R_K, hf.topk_ids_R_K)
        torch.testing.assert_close(got.topk_logprobs_R_K, hf.topk_logprobs_R_K, atol=1e-5, rtol=0)


def test_ranks_beyond_k_skipped_and_sampled_token_with_rank_above_k_gets_no_slot():
    token_ids = [5, 6]  # one completion token, id 6, which the teacher ranks 7th
    row = {7: Logprob(-0.5, 1), 8: Logprob(-1.0, 2), 9: Logprob(-2.0, 3), 6: Logprob(-4.0, 7)}
    for rows in ([None, row], [{str(i): vars(e) for i, e in row.items()}]):
        got = parse_prompt_logprobs(rows, token_ids, prompt_len=1, topk=2)
        assert got.logprobs_R.tolist() == [-4.0]
        assert got.topk_ids_R_K.tolist() == [[7, 8]]
        assert got.topk_logprobs_R_K.tolist() == [[-0.5, -1.0]]


def test_missing_slots_filled_with_id_0_and_minus_inf_and_http_clamp_undone():
    rows = [None, {"6": {"logprob": -0.1, "rank": 1}, "3": {"logprob": -9999.0, "rank": 2}}]
    got = parse_prompt_logprobs(rows, [5, 6], prompt_len=1, topk=4)
    assert got.topk_ids_R_K.tolist() == [[6, 3, 0, 0]]
    assert got.topk_logprobs_R_K[0, 0].item() == pytest.approx(-0.1)
    assert got.topk_logprobs_R_K[0, 1:].tolist() == [-math.inf] * 3


def test_without_ranks_topk_falls_back_to_logprob_order():
    rows = [None, {6: Logprob(-3.0), 7: Logprob(-0.2), 8: Logprob(-1.0)}]
    got = parse_prompt_logprobs(rows, [5, 6], prompt_len=1, topk=2)
    assert got.topk_ids_R_K.tolist() == [[7, 8]] and got.logprobs_R.tolist() == [-3.0]


def test_none_and_empty_entries_outside_the_span_and_none_values_are_skipped():
    token_ids, prompt_len = [1, 2, 3, 4, 5], 3  # completion: tokens 4, 5 at target positions 2, 3
    rows = [None, {}, None, {4: Logprob(-1.0, 1), 9: None}, {5: Logprob(-2.0, 1)}]
    got = parse_prompt_logprobs(rows, token_ids, prompt_len, topk=2)
    assert got.logprobs_R.tolist() == [-1.0, -2.0]
    assert got.topk_ids_R_K.tolist() == [[4, 0], [5, 0]]


def test_missing_sampled_token_raises_naming_the_position():
    rows = [None, {2: Logprob(-1.0, 1)}, {9: Logprob(-0.1, 1)}]  # token 3 (position 2) absent
    with pytest.raises(ValueError, match=r"row 7, completion token 1 \(sequence position 2, token id 3\)"):
        parse_prompt_logprobs(rows, [1, 2, 3], prompt_len=1, topk=1, row=7)
    with pytest.raises(ValueError, match="completion token 0"):
        parse_prompt_logprobs([None, None, {3: Logprob(-1.0, 1)}], [1, 2, 3], prompt_len=1, topk=0)


def test_bad_layouts_and_non_logprobs_raise():
    with pytest.raises(ValueError, match="3 prompt-logprob rows for 5 tokens"):
        parse_prompt_logprobs([None, {}, {}], [1, 2, 3, 4, 5], prompt_len=2, topk=0)
    with pytest.raises(ValueError, match="ambiguous"):
        parse_prompt_logprobs([{1: Logprob(-1.0, 1)}, {2: Logprob(-1.0, 1)}], [1, 2], prompt_len=1, topk=0)
    with pytest.raises(ValueError, match="not logprobs"):  # e.g. a server in --logprobs-mode raw_logits
        parse_prompt_logprobs([None, {2: Logprob(3.5, 1)}], [1, 2], prompt_len=1, topk=0)


# ---- split_by_tokens ---------------------------------------------------------------------------------------------


def best_max_part(lengths: list[int], m: int) -> int:
    """Brute force: the smallest possible largest part over all splits into m contiguous non-empty parts."""
    cuts = itertools.combinations(range(1, len(lengths)), m - 1)
    return min(max(sum(lengths[a:b]) for a, b in zip((0, *c), (*c, len(lengths)))) for c in cuts)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 50), max_size=9), st.integers(1, 5))
def test_split_by_tokens_is_an_optimal_contiguous_cover(lengths, n_parts):
    parts = split_by_tokens(lengths, n_parts)
    m = min(n_parts, len(lengths))
    assert len(parts) == m
    assert [i for part in parts for i in part] == list(range(len(lengths)))  # contiguous, ordered cover
    assert all(len(part) > 0 for part in parts)
    if m:
        worst = max(sum(lengths[i] for i in part) for part in parts)
        assert worst == best_max_part(lengths, m)
        assert worst <= max(max(lengths), math.ceil(sum(lengths) / m) + max(lengths))


def test_split_by_tokens_one_long_row_sits_alone():
    assert split_by_tokens([5, 5, 100, 5, 5, 5], 3) == [range(0, 2), range(2, 3), range(3, 6)]
    assert split_by_tokens([3, 3], 5) == [range(0, 1), range(1, 2)]
    with pytest.raises(ValueError):
        split_by_tokens([1], 0)


# ---- the temperature rule ----------------------------------------------------------------------------------------


def test_prompt_logprob_temperature_refused_unless_supported():
    check_prompt_logprob_temperature(1.0, supported=False)
    check_prompt_logprob_temperature(0.6, supported=True)
    with pytest.raises(ValueError, match="temperature 0.6.*teacher_backend='hf'"):
        check_prompt_logprob_temperature(0.6, supported=False)
    with pytest.raises(ValueError, match="> 0"):
        check_prompt_logprob_temperature(0.0, supported=True)


# ---- rollout parsing ---------------------------------------------------------------------------------------------


def test_rollout_keeps_the_generated_eos_with_its_logprob():
    logprobs = [{4: Logprob(-0.3, 1), 9: Logprob(-2.0, 2)}, {"2": {"logprob": -0.7, "rank": 1}}]
    r = rollout_from_completion([1, 3], 5, (4, 2), logprobs, "stop", None, eos_id=2)
    assert (r.completion_ids, r.sampler_logprobs, r.finish_reason, r.prompt_index) == ([4, 2], [-0.3, -0.7], "stop", 5)
    r = rollout_from_completion([1, 3], 0, [4, 7], [{4: Logprob(-0.3)}, {7: Logprob(-0.1)}], "stop", 7, eos_id=2)
    assert r.completion_ids == [4, 7]  # stopped by an extra eos id from generation_config.json
    assert rollout_from_completion([1], 0, [4], [{4: Logprob(-0.3)}], "length", None, 2).finish_reason == "length"
    # the engine passes the run's whole stop set: a stop on any of its ids is a stop, on another id it is not
    r = rollout_from_completion([1], 0, [4, 9], [{4: Logprob(-0.3)}, {9: Logprob(-0.2)}], "stop", None, eos_id=(2, 9))
    assert (r.completion_ids, r.finish_reason) == ([4, 9], "stop")
    with pytest.raises(ValueError, match="last token is 4"):
        rollout_from_completion([1], 0, [4], [{4: Logprob(-0.3)}], "stop", None, eos_id=(2, 9))


def test_rollout_parsing_raises_on_inconsistent_outputs():
    with pytest.raises(ValueError, match="last token is 4"):
        rollout_from_completion([1], 0, [4], [{4: Logprob(-0.3)}], "stop", None, eos_id=2)
    with pytest.raises(ValueError, match="generated token 1 \\(id 2\\)"):
        rollout_from_completion([1], 3, [4, 2], [{4: Logprob(-0.3)}, {9: Logprob(-0.1)}], "stop", None, 2)
    with pytest.raises(ValueError, match="finish_reason 'abort'"):
        rollout_from_completion([1], 0, [4], [{4: Logprob(-0.3)}], "abort", None, 2)
    with pytest.raises(ValueError, match="1 logprob rows for 2"):
        sampled_logprobs([4, 2], [{4: Logprob(-0.3)}], "prompt 0")
    with pytest.raises(ValueError, match="-inf"):
        sampled_logprobs([4], [{4: Logprob(-math.inf)}], "prompt 0")


def test_which_samplings_need_processed_logprobs_and_seeds_are_distinct():
    assert not needs_processed_logprobs(Sampling())
    assert not needs_processed_logprobs(Sampling(greedy=True))
    for s in (Sampling(temperature=0.7), Sampling(top_k=5), Sampling(top_p=0.9), Sampling(min_new_tokens=1)):
        assert needs_processed_logprobs(s)
    n = 4  # request k's samples get seed + j, j < n (vLLM parallel sampling)
    seeds = {request_seed(3, k, n) + j for k in range(50) for j in range(n)}
    assert len(seeds) == 50 * n


def test_constructors_without_vllm_say_how_to_install(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    from opd.rollout.vllm import VLLMRolloutEngine
    from opd.teacher.vllm import VLLMTeacherScorer

    with pytest.raises(ImportError, match=r"pip install opd\[vllm\]"):
        VLLMRolloutEngine("some/folder", tokenizer)
    with pytest.raises(ImportError, match=r"pip install opd\[vllm\]"):
        VLLMTeacherScorer("some/folder")


# ---- ServedTeacherScorer against a canned local server -----------------------------------------------------------


class FakeVLLM(BaseHTTPRequestHandler):
    """Answers like `vllm serve` from `fake_table`; `server.state["mode"]` injects faults."""

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        assert self.path == "/v1/models", self.path
        self._send(200, {"object": "list", "data": [{"id": "teacher", "max_model_len": self.server.state["max_len"]}]})

    def do_POST(self):
        state = self.server.state
        assert self.path == "/v1/completions", self.path
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state["bodies"].append(body)
        mode = state["mode"]
        if mode == "hang":  # outlive the client's timeout, then hang up without an answer
            time.sleep(0.3)
            return
        if mode == "fail_once" and len(state["bodies"]) == 1:
            return self._send(503, {"error": {"message": "warming up"}})
        choices = []
        for index, seq in enumerate(body["prompt"]):
            echoed = seq[:-1] + [seq[-1] + 1] if mode == "bad_echo" else seq
            choices.append({"index": index, "text": "", "finish_reason": "length", "prompt_token_ids": echoed,
                            "prompt_logprobs": vllm_rows(fake_table(seq), seq, body["prompt_logprobs"], http=True)})
        self._send(200, {"model": "teacher", "choices": choices,
                         "usage": {"prompt_tokens": sum(map(len, body["prompt"])), "completion_tokens": len(choices)}})


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    httpd.daemon_threads = False  # server_close() joins in-flight handlers: nothing outlives the test
    httpd.state = {"mode": "ok", "bodies": [], "max_len": 64}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


ROLLOUTS = [Rollout([1, 4, 5], [6, 7, 2], [-1.0] * 3, "stop", 0, teacher_prompt_ids=[1, 9, 9, 4, 5]),
            Rollout([1, 3], [8, 8, 8, 8, 8, 8, 8], [-1.0] * 7, "length", 1),
            Rollout([1, 3], [5, 2], [-1.0] * 2, "stop", 1)]


def test_served_scorer_matches_the_canned_teacher_across_two_urls(server):
    httpd, url = server
    scorer = ServedTeacherScorer([url, url + "/v1/"], "teacher", timeout_s=5, retries=0, batch_size=2)
    scores = scorer.score(ROLLOUTS, temperature=1.0, topk=3)
    for r, s in zip(ROLLOUTS, scores, strict=True):
        want_lp, want_ids, want_values = expected_scores(r.teacher_prompt_ids + r.completion_ids,
                                                         len(r.teacher_prompt_ids), 3)
        torch.testing.assert_close(s.logprobs_R, want_lp)
        assert torch.equal(s.topk_ids_R_K, want_ids)
        torch.testing.assert_close(s.topk_logprobs_R_K, want_values)
    bodies = httpd.state["bodies"]
    assert sorted(len(b["prompt"]) for b in bodies) == [1, 2]  # split over 2 URLs by tokens: [8] vs [9, 4]
    assert all(b["max_tokens"] == 1 and b["prompt_logprobs"] == 3 and b["temperature"] == 1.0
               and b["return_token_ids"] and not b["add_special_tokens"] for b in bodies)


def test_served_scorer_retries_a_transient_503(server):
    httpd, url = server
    httpd.state["mode"] = "fail_once"
    scores = ServedTeacherScorer(url, "teacher", timeout_s=5, retries=2, backoff=0.001).score(ROLLOUTS[:1], 1.0)
    assert len(scores) == 1 and scores[0].topk_ids_R_K is None
    assert len(httpd.state["bodies"]) == 2


def test_served_scorer_rejects_a_mismatched_echo_and_overlong_rows(server):
    httpd, url = server
    httpd.state["mode"] = "bad_echo"
    with pytest.raises(ValueError, match="row 0: .* scored other tokens than were sent"):
        ServedTeacherScorer(url, "teacher", timeout_s=5, retries=0).score(ROLLOUTS[:1], 1.0)
    httpd.state["mode"], httpd.state["max_len"] = "ok", 9  # row 1 has 9 tokens, + 1 generated
    with pytest.raises(ValueError, match="row 1: 9 tokens \\+ 1 generated exceed max_model_len=9"):
        ServedTeacherScorer(url, "teacher", timeout_s=5, retries=0).score(ROLLOUTS, 1.0)
    with pytest.raises(ValueError, match="does not serve 'other'"):
        ServedTeacherScorer(url, "other", timeout_s=5, retries=0).score(ROLLOUTS, 1.0)
    with pytest.raises(ValueError, match="temperature 0.5"):
        ServedTeacherScorer(url, "teacher").score(ROLLOUTS, 0.5)


def test_served_scorer_gives_up_after_retries_naming_the_url(server):
    httpd, url = server
    httpd.state["mode"] = "hang"
    with pytest.raises(RuntimeError, match=rf"{url}/v1/completions: no answer after 2 attempts"):
        ServedTeacherScorer(url, "teacher", timeout_s=0.05, retries=1, backoff=0.001).score(ROLLOUTS[:1], 1.0)
    closed = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)  # take a free port, then close it: refused
    dead = f"http://127.0.0.1:{closed.server_address[1]}"
    closed.server_close()
    with pytest.raises(RuntimeError, match=rf"{dead}/v1/models: no answer after 3 attempts"):
        ServedTeacherScorer(dead, "teacher", timeout_s=1, retries=2, backoff=0.001).score(ROLLOUTS[:1], 1.0)


# ---- GPU: the real engines against the transformers ones ---------------------------------------------------------


@pytest.mark.gpu
@gpu
def test_vllm_rollout_logprobs_are_those_of_the_processed_distribution(tokenizer):
    from opd.models import load_model
    from opd.rollout.vllm import VLLMRolloutEngine

    student = load_model("tiny:student", device="cuda")
    engine = VLLMRolloutEngine(student, tokenizer, gpu_memory_utilization=0.15, enforce_eager=True)
    prompts = [tokenizer("12+7=")["input_ids"], tokenizer("3*4=")["input_ids"]]
    sampling = Sampling(temperature=0.7, top_k=20, max_new_tokens=24)
    for step in range(2):
        rollouts = engine.generate(prompts, n=3, sampling=sampling, seed=step)
        assert [r.prompt_index for r in rollouts] == [0, 0, 0, 1, 1, 1]
        for r in rollouts:
            seq = torch.tensor([r.prompt_ids + r.completion_ids], device="cuda")
            with torch.no_grad():
                z_R_V = student(seq).logits[0, len(r.prompt_ids) - 1 : -1].float() / sampling.temperature
            kth_R = z_R_V.topk(sampling.top_k, dim=-1).values[:, -1:]
            lp_R_V = torch.log_softmax(z_R_V.masked_fill(z_R_V < kth_R, -math.inf), dim=-1)
            want_R = lp_R_V.gather(-1, seq[0, len(r.prompt_ids):, None]).squeeze(-1).cpu()
            torch.testing.assert_close(torch.tensor(r.sampler_logprobs), want_R, atol=2e-3, rtol=0)
            assert (r.finish_reason == "stop") == (r.completion_ids[-1] == tokenizer.eos_token_id)
        with torch.no_grad():  # a changed student must be what the engine samples next
            student.lm_head.weight.mul_(1.5)
        engine.load_weights(student)


@pytest.mark.gpu
@gpu
def test_vllm_teacher_matches_the_hf_teacher(teacher):
    from opd.teacher.hf import HFTeacherScorer
    from opd.teacher.vllm import VLLMTeacherScorer

    scorer = VLLMTeacherScorer(teacher.name_or_path, dtype="float32", gpu_memory_utilization=0.15,
                               enforce_eager=True)
    got = scorer.score(ROLLOUTS, temperature=1.0, topk=4)
    want = HFTeacherScorer(teacher).score(ROLLOUTS, temperature=1.0, topk=4)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.logprobs_R, w.logprobs_R, atol=2e-3, rtol=0)
        torch.testing.assert_close(g.topk_logprobs_R_K, w.topk_logprobs_R_K, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="temperature 0.5"):
        scorer.score(ROLLOUTS, temperature=0.5)
