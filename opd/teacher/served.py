"""A teacher behind `vllm serve`: `prompt_logprobs` from the OpenAI-compatible `/v1/completions`.

Standard library only (urllib + json). Request and response follow vLLM's completion API
(`vllm/entrypoints/openai/completion/protocol.py`, formerly `openai/protocol.py`, main branch of
2026-11, the 0.33 line): `CompletionRequest.prompt` may be a list of token-id lists (one choice per
prompt, `choice.index` = prompt index), `prompt_logprobs` is a vLLM extra (0 = only the prompt token
itself), and `return_token_ids` makes each choice echo `prompt_token_ids` and carry the generated
`token_ids`; `CompletionResponseChoice.prompt_logprobs` is `list[dict[str, Logprob JSON] | None]`,
parsed by `opd.teacher.vllm.parse_prompt_logprobs`, with -inf sent as -9999.0. `/v1/models` lists
one card per served name (`--served-model-name a b`: cards `a` and `b`, same `root`) with
`max_model_len`; a response's `model` is always the FIRST served name, whichever alias was asked
for. It does not list `--max-logprobs` (default 20): a `prompt_logprobs` above it is a 400, turned
here into the fix. The server ignores unknown request fields (pydantic `extra="allow"`), so a
temperature for prompt logprobs cannot be asked for and checked: τ ≠ 1 is refused (docs/design.md §4).
Full-vocabulary prompt logprobs (`prompt_logprobs=-1`, which would let the client temper them)
are not offered: V entries per position in JSON (152k × 256 tokens ≈ 39M objects per sequence).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from opd.teacher import NEEDS_LOGPROBS_AT_IDS, TeacherScores
from opd.teacher.vllm import check_prompt_logprob_temperature, parse_prompt_logprobs, split_by_tokens
from opd.types import Rollout

MAX_PROMPTS_PER_REQUEST = 1024  # more prompts in one request than vLLM's completion endpoint takes

_TRANSIENT = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)


def _endpoint(base_url: str, path: str) -> str:
    """`http://host:8000` or `http://host:8000/v1` (the OpenAI client's base_url) + `/completions`."""
    base = base_url.rstrip("/")
    return f"{base}/{path}" if base.endswith("/v1") else f"{base}/v1/{path}"


class ServerError(RuntimeError):
    """A 4xx answer that retrying cannot fix; `code` and `detail` (the server's message) kept for the caller."""

    def __init__(self, url: str, code: int, detail: str):
        super().__init__(f"{url} answered HTTP {code}: {detail}")
        self.code, self.detail = code, detail


def request_json(url: str, body: dict | None, timeout_s: float, retries: int, backoff: float,
                 api_key: str | None = None) -> dict:
    """POST `body` (GET if None) and decode the JSON answer.

    Connection errors, timeouts, 429 and 5xx are retried `retries` times after waits of
    backoff, 2·backoff, 4·backoff...; another 4xx raises at once with the server's message.
    """
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the teacher is on our network
    last_error = "none"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with opener.open(urllib.request.Request(url, data=data, headers=headers), timeout=timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:1000].decode(errors="replace")
            if error.code != 429 and error.code < 500:
                raise ServerError(url, error.code, detail) from error
            last_error = f"HTTP {error.code}: {detail}"
            continue
        except _TRANSIENT as error:
            last_error = repr(error)
            continue
        try:
            return json.loads(payload)
        except json.JSONDecodeError as error:
            raise RuntimeError(f"{url} answered with something that is not JSON: {payload[:200]!r}") from error
    raise RuntimeError(f"{url}: no answer after {retries + 1} attempts (timeout {timeout_s} s each); "
                       f"last error: {last_error}")


def completion_body(seqs: list[list[int]], model_name: str, topk: int, temperature: float) -> dict:
    """One `/v1/completions` request scoring `seqs` (token ids, nothing added), one generated token each."""
    return {"model": model_name, "prompt": seqs, "max_tokens": 1, "n": 1, "prompt_logprobs": topk,
            "temperature": temperature, "echo": False, "return_token_ids": True, "add_special_tokens": False,
            "stream": False}


def greedy_body(prompts: list[list[int]], model_name: str, max_new_tokens: int) -> dict:
    """One `/v1/completions` request decoding each prompt greedily; the server stops on the model's eos ids."""
    return {"model": model_name, "prompt": prompts, "max_tokens": max_new_tokens, "n": 1, "temperature": 0.0,
            "echo": False, "return_token_ids": True, "add_special_tokens": False, "ignore_eos": False,
            "stream": False}


def _choices(response: dict, seqs: list[list[int]], rows: Sequence[int], served_names: set[str], url: str) -> list:
    """The response's choices in prompt order, after checking the model, the indices and every echo."""
    if response.get("model") not in served_names:
        raise ValueError(f"{url} answered for model {response.get('model')!r}, which it does not list as a name "
                         f"of the teacher asked for ({sorted(served_names)})")
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", -1))
    if [c.get("index") for c in choices] != list(range(len(seqs))):
        raise ValueError(f"{url}: choice indices {[c.get('index') for c in choices]} for {len(seqs)} prompts "
                         f"(rows {rows[0]}..{rows[-1]})")
    for row, seq, choice in zip(rows, seqs, choices, strict=True):
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and list(echoed) != seq:
            first = next((i for i, (a, b) in enumerate(zip(echoed, seq)) if a != b), min(len(echoed), len(seq)))
            raise ValueError(f"row {row}: {url} scored other tokens than were sent ({len(echoed)} echoed, "
                             f"{len(seq)} sent, first difference at position {first})")
    return choices


def parse_completion_response(response: dict, seqs: list[list[int]], prompt_lens: list[int], rows: Sequence[int],
                              served_names: set[str], topk: int, url: str) -> list[TeacherScores]:
    """Scores of `seqs` (global row numbers `rows`) after checking every echo against what was sent."""
    choices = _choices(response, seqs, rows, served_names, url)
    prompt_tokens = (response.get("usage") or {}).get("prompt_tokens")
    if prompt_tokens is not None and prompt_tokens != sum(map(len, seqs)):
        raise ValueError(f"{url}: usage.prompt_tokens={prompt_tokens}, sent {sum(map(len, seqs))} tokens "
                         f"(rows {rows[0]}..{rows[-1]})")
    scores = []
    for row, seq, prompt_len, choice in zip(rows, seqs, prompt_lens, choices, strict=True):
        if choice.get("prompt_logprobs") is None:
            raise ValueError(f"row {row}: {url} returned no prompt_logprobs")
        scores.append(parse_prompt_logprobs(choice["prompt_logprobs"], seq, prompt_len, topk, row=row))
    return scores


def parse_greedy_response(response: dict, prompts: list[list[int]], rows: Sequence[int], served_names: set[str],
                          max_new_tokens: int, url: str) -> list[list[int]]:
    """The generated token ids of each prompt (eos kept), checked for count and finish reason."""
    traces = []
    for row, choice in zip(rows, _choices(response, prompts, rows, served_names, url), strict=True):
        ids = choice.get("token_ids")
        if ids is None:
            raise ValueError(f"row {row}: {url} returned no token_ids; the server needs vLLM >= 0.10.2 "
                             "(`return_token_ids`)")
        if not 1 <= len(ids) <= max_new_tokens or choice.get("finish_reason") not in ("stop", "length"):
            raise ValueError(f"row {row}: {url} generated {len(ids)} tokens (max_tokens={max_new_tokens}) with "
                             f"finish_reason {choice.get('finish_reason')!r}")
        traces.append([int(t) for t in ids])
    return traces


class ServedTeacherScorer:
    """Scores against one or more `vllm serve` endpoints; rows are split across them by `split_by_tokens`.

    `base_url`: a URL or list of URLs serving the same teacher as `model_name` (any of its
    `--served-model-name` aliases); each request carries up to `batch_size` rows (at most 1,024).
    """

    def __init__(self, base_url: str | list[str], model_name: str, timeout_s: float = 300.0, retries: int = 3,
                 backoff: float = 1.0, batch_size: int = 32, api_key: str | None = None):
        self.urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not self.urls or retries < 0 or timeout_s <= 0 or not 1 <= batch_size <= MAX_PROMPTS_PER_REQUEST:
            raise ValueError(f"need >= 1 URL, retries >= 0, timeout_s > 0, 1 <= batch_size <= "
                             f"{MAX_PROMPTS_PER_REQUEST}; got {self.urls}, {retries}, {timeout_s}, {batch_size}")
        self.model_name, self.timeout_s, self.retries, self.backoff = model_name, timeout_s, retries, backoff
        self.batch_size, self.api_key = batch_size, api_key
        self._cards: dict[str, tuple[int | None, set[str]]] = {}

    def _request(self, url: str, body: dict | None) -> dict:
        return request_json(url, body, self.timeout_s, self.retries, self.backoff, self.api_key)

    def _card(self, base_url: str) -> tuple[int | None, set[str]]:
        """(the server's `max_model_len` for our model or None, every name it serves that model under)."""
        if base_url not in self._cards:
            url = _endpoint(base_url, "models")
            cards = self._request(url, None).get("data") or []
            card = next((c for c in cards if c.get("id") == self.model_name), None)
            if card is None:
                raise ValueError(f"{url} does not serve {self.model_name!r}; it serves {[c.get('id') for c in cards]} "
                                 "(set teacher_model_name= to one of them)")
            aliases = {c.get("id") for c in cards if card.get("root") is not None and c.get("root") == card.get("root")}
            self._cards[base_url] = (card.get("max_model_len"), aliases | {self.model_name})
        return self._cards[base_url]

    def max_model_len(self, base_url: str) -> int | None:
        """The server's `max_model_len` for our model (from `/v1/models`), or None if it does not say."""
        return self._card(base_url)[0]

    def _post(self, base_url: str, body: dict, topk: int = 0) -> dict:
        url = _endpoint(base_url, "completions")
        try:
            return self._request(url, body)
        except ServerError as error:  # vLLM: "Requested prompt logprobs of 50, which is greater than max allowed: 20"
            if error.code == 400 and topk > 0 and "logprobs" in error.detail and "max" in error.detail:
                raise ValueError(f"{url} refused prompt_logprobs={topk} (topk): start `vllm serve` with "
                                 f"--max-logprobs {topk} (its default is 20), or lower topk; server said: "
                                 f"{error.detail[:300]}") from error
            raise

    def _check_lengths(self, base_url: str, seqs: list[list[int]], rows: range, extra: int) -> None:
        limit = self.max_model_len(base_url)
        for row in rows:
            if limit is not None and len(seqs[row]) + extra > limit:
                raise ValueError(f"row {row}: {len(seqs[row])} tokens + {extra} generated exceed max_model_len="
                                 f"{limit} of {base_url}")

    def _map(self, seqs: list[list[int]], run_batch, extra: int) -> list:
        """`run_batch(base_url, rows)` over batches of rows, the URLs' parts in parallel, results in row order."""
        parts = split_by_tokens([len(s) for s in seqs], len(self.urls))

        def run(i: int) -> list:
            url, part = self.urls[i], parts[i]
            self._check_lengths(url, seqs, part, extra)
            out = []
            for start in range(part.start, part.stop, self.batch_size):
                out += run_batch(url, range(start, min(start + self.batch_size, part.stop)))
            return out

        with ThreadPoolExecutor(max_workers=max(len(parts), 1)) as pool:
            return [item for part_items in pool.map(run, range(len(parts))) for item in part_items]

    def score(self, rollouts: list[Rollout], temperature: float, topk: int = 0, full_logits: bool = False,
              at_sampler_topk: bool = False) -> list[TeacherScores]:
        if at_sampler_topk:
            raise ValueError(NEEDS_LOGPROBS_AT_IDS)
        if full_logits:
            raise ValueError("a served teacher cannot return full-vocabulary logits; use teacher_backend='hf'")
        check_prompt_logprob_temperature(temperature, supported=False)
        seqs = [r.teacher_prompt_ids + r.completion_ids for r in rollouts]
        prompt_lens = [len(r.teacher_prompt_ids) for r in rollouts]

        def run_batch(url: str, rows: range) -> list[TeacherScores]:
            body = completion_body([seqs[r] for r in rows], self.model_name, topk, temperature)
            return parse_completion_response(self._post(url, body, topk), [seqs[r] for r in rows],
                                             [prompt_lens[r] for r in rows], rows, self._card(url)[1], topk, url)

        return self._map(seqs, run_batch, extra=1)

    def generate_greedy(self, prompts_P: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        prompts = [list(p) for p in prompts_P]

        def run_batch(url: str, rows: range) -> list[list[int]]:
            batch = [prompts[r] for r in rows]
            response = self._post(url, greedy_body(batch, self.model_name, max_new_tokens))
            return parse_greedy_response(response, batch, rows, self._card(url)[1], max_new_tokens, url)

        return self._map(prompts, run_batch, extra=max_new_tokens)
