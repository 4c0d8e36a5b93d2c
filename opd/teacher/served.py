"""A teacher behind `vllm serve`: `prompt_logprobs` from the OpenAI-compatible `/v1/completions`.

Standard library only (urllib + json). Request and response follow vLLM's
`vllm/entrypoints/openai/protocol.py`: `CompletionRequest.prompt` may be a list of token-id
lists (one choice per prompt, `choice.index` = prompt index), `prompt_logprobs` is a vLLM
extra (0 = only the prompt token itself), and `return_token_ids` makes each choice echo
`prompt_token_ids`; `CompletionResponseChoice.prompt_logprobs` is `list[dict[str, Logprob
JSON] | None]`, parsed by `opd.teacher.vllm.parse_prompt_logprobs`. `/v1/models` lists
`max_model_len` per served model. The server ignores unknown request fields (pydantic
`extra="allow"`), so a temperature for prompt logprobs cannot be asked for and checked:
τ ≠ 1 is refused (DESIGN.md §4).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from opd.teacher import TeacherScores
from opd.teacher.vllm import check_prompt_logprob_temperature, parse_prompt_logprobs, split_by_tokens
from opd.types import Rollout

_TRANSIENT = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)


def _endpoint(base_url: str, path: str) -> str:
    """`http://host:8000` or `http://host:8000/v1` (the OpenAI client's base_url) + `/completions`."""
    base = base_url.rstrip("/")
    return f"{base}/{path}" if base.endswith("/v1") else f"{base}/v1/{path}"


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
                raise RuntimeError(f"{url} answered HTTP {error.code}: {detail}") from error
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


def parse_completion_response(response: dict, seqs: list[list[int]], prompt_lens: list[int], rows: Sequence[int],
                              model_name: str, topk: int, url: str) -> list[TeacherScores]:
    """Scores of `seqs` (global row numbers `rows`) after checking every echo against what was sent."""
    if response.get("model") != model_name:
        raise ValueError(f"{url} answered for model {response.get('model')!r}, asked for {model_name!r}")
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", -1))
    if [c.get("index") for c in choices] != list(range(len(seqs))):
        raise ValueError(f"{url}: choice indices {[c.get('index') for c in choices]} for {len(seqs)} prompts "
                         f"(rows {rows[0]}..{rows[-1]})")
    prompt_tokens = (response.get("usage") or {}).get("prompt_tokens")
    if prompt_tokens is not None and prompt_tokens != sum(map(len, seqs)):
        raise ValueError(f"{url}: usage.prompt_tokens={prompt_tokens}, sent {sum(map(len, seqs))} tokens "
                         f"(rows {rows[0]}..{rows[-1]})")
    scores = []
    for row, seq, prompt_len, choice in zip(rows, seqs, prompt_lens, choices, strict=True):
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and list(echoed) != seq:
            first = next((i for i, (a, b) in enumerate(zip(echoed, seq)) if a != b), min(len(echoed), len(seq)))
            raise ValueError(f"row {row}: {url} scored other tokens than were sent ({len(echoed)} echoed, "
                             f"{len(seq)} sent, first difference at position {first})")
        if choice.get("prompt_logprobs") is None:
            raise ValueError(f"row {row}: {url} returned no prompt_logprobs")
        scores.append(parse_prompt_logprobs(choice["prompt_logprobs"], seq, prompt_len, topk, row=row))
    return scores


class ServedTeacherScorer:
    """Scores against one or more `vllm serve` endpoints; rows are split across them by `split_by_tokens`.

    `base_url`: a URL or list of URLs serving the same teacher as `model_name`; each
    request carries up to `batch_size` rows.
    """

    def __init__(self, base_url: str | list[str], model_name: str, timeout_s: float = 300.0, retries: int = 3,
                 backoff: float = 1.0, batch_size: int = 32, api_key: str | None = None):
        self.urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not self.urls or retries < 0 or timeout_s <= 0 or batch_size < 1:
            raise ValueError(f"need >= 1 URL, retries >= 0, timeout_s > 0, batch_size >= 1; got {self.urls}, "
                             f"{retries}, {timeout_s}, {batch_size}")
        self.model_name, self.timeout_s, self.retries, self.backoff = model_name, timeout_s, retries, backoff
        self.batch_size, self.api_key = batch_size, api_key
        self._max_model_len: dict[str, int | None] = {}

    def _request(self, url: str, body: dict | None) -> dict:
        return request_json(url, body, self.timeout_s, self.retries, self.backoff, self.api_key)

    def max_model_len(self, base_url: str) -> int | None:
        """The server's `max_model_len` for our model (from `/v1/models`), or None if it does not say."""
        if base_url not in self._max_model_len:
            url = _endpoint(base_url, "models")
            cards = self._request(url, None).get("data") or []
            card = next((c for c in cards if c.get("id") == self.model_name), None)
            if card is None:
                raise ValueError(f"{url} does not serve {self.model_name!r}; it serves {[c.get('id') for c in cards]}")
            self._max_model_len[base_url] = card.get("max_model_len")
        return self._max_model_len[base_url]

    def score(self, rollouts: list[Rollout], temperature: float, topk: int = 0, full_logits: bool = False
              ) -> list[TeacherScores]:
        if full_logits:
            raise ValueError("a served teacher cannot return full-vocabulary logits; use teacher_backend='hf'")
        check_prompt_logprob_temperature(temperature, supported=False)
        seqs = [r.teacher_prompt_ids + r.completion_ids for r in rollouts]
        prompt_lens = [len(r.teacher_prompt_ids) for r in rollouts]
        parts = split_by_tokens([len(s) for s in seqs], len(self.urls))

        def run(i: int) -> list[TeacherScores]:
            url, part = self.urls[i], parts[i]
            limit = self.max_model_len(url)
            for row in part:
                if limit is not None and len(seqs[row]) + 1 > limit:
                    raise ValueError(f"row {row}: teacher prompt + completion is {len(seqs[row])} tokens; with the "
                                     f"one generated token it exceeds max_model_len={limit} of {url}")
            out = []
            for start in range(part.start, part.stop, self.batch_size):
                rows = range(start, min(start + self.batch_size, part.stop))
                body = completion_body([seqs[r] for r in rows], self.model_name, topk, temperature)
                response = self._request(_endpoint(url, "completions"), body)
                out += parse_completion_response(response, [seqs[r] for r in rows], [prompt_lens[r] for r in rows],
                                                 rows, self.model_name, topk, url)
            return out

        with ThreadPoolExecutor(max_workers=max(len(parts), 1)) as pool:
            return [score for part_scores in pool.map(run, range(len(parts))) for score in part_scores]
