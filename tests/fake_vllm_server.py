"""A stand-in for `vllm serve MODEL --served-model-name A B --max-logprobs K`, backed by a real HF model.

Run as a script (tests/test_served.py starts it in a subprocess, so the teacher's weights live in
another process): it binds 127.0.0.1 on a port the OS picks, prints `PORT <n>`, and answers
`GET /v1/models` and `POST /v1/completions` in vLLM 0.33's JSON: `prompt_logprobs` as a list with
`null` first and then dicts keyed by the token id as a string, `{"logprob", "rank", "decoded_token"}`,
-inf sent as -9999.0; `prompt_token_ids` and `token_ids` per choice (`return_token_ids`); the
response's `model` is always the first served name; a prompt_logprobs above --max-logprobs is a 400.
Greedy completions (temperature 0) come from opd's HF rollout engine, which stops on the eos.

Faults for tests: `POST /_fault {"mode": ..., "count": n, "delay": s}` with mode `late` (answer
after `delay` seconds), `drop` (close the connection without an answer), `bad_echo` (echo other
prompt tokens), `wrong_model` (answer for another model), `batch_template` (a request of several
prompts is scored with TEMPLATE's tokens before each, as a server whose batched path renders a chat
template its single requests do not; the echo is still what was sent); each applies to the next
`count` completion requests. `GET /_stats` counts the completion requests. `running` starts one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from opd.models import load_model, load_tokenizer, resolve
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine

NEG_INF_JSON = -9999.0
TEMPLATE = "<|system|>Answer briefly.\n"  # what `batch_template` puts before each prompt of a batched request


@contextlib.contextmanager
def running(model: str, *args: str):
    """This server for `model` (and its `args`) in a subprocess, on a port the OS picked; yields its base URL."""
    root = Path(__file__).resolve().parent.parent
    env = os.environ | {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), model, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = process.stdout.readline()  # blocks until the model is loaded and the port bound
        assert line.startswith("PORT "), f"the fake server did not start (said {line!r}, exit {process.poll()})"
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str, kind: str) -> None:
        self._send(code, {"error": {"message": message, "type": kind, "param": None, "code": code}})

    def do_GET(self):
        app = self.server.app
        if self.path == "/_stats":
            return self._send(200, {"completions": app.completions})
        if self.path != "/v1/models":
            return self._error(404, f"no route {self.path}", "NotFoundError")
        cards = [{"id": name, "object": "model", "created": app.created, "owned_by": "vllm", "root": app.root,
                  "parent": None, "max_model_len": app.max_model_len, "permission": []} for name in app.names]
        self._send(200, {"object": "list", "data": cards})

    def do_POST(self):
        app = self.server.app
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path == "/_fault":
            with app.lock:
                app.fault = {"mode": body["mode"], "count": body.get("count", 1), "delay": body.get("delay", 0.0)}
            return self._send(200, {"ok": True})
        if self.path != "/v1/completions":
            return self._error(404, f"no route {self.path}", "NotFoundError")
        with app.lock:
            app.completions += 1
            mode = None
            if app.fault["count"] > 0:
                mode, app.fault["count"] = app.fault["mode"], app.fault["count"] - 1
        if mode == "drop":
            self.close_connection = True
            return
        if mode == "late":
            time.sleep(app.fault["delay"])
        if body.get("model") not in app.names:
            return self._error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        k = body.get("prompt_logprobs")
        if k is not None and k > app.max_logprobs:
            return self._error(400, f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                    f"{app.max_logprobs}", "BadRequestError")
        try:
            payload = app.complete(body, mode)
        except BrokenPipeError:
            return
        try:
            self._send(200, payload)
        except (BrokenPipeError, ConnectionResetError):  # a `late` answer the client stopped waiting for
            pass


class App:
    def __init__(self, model: str, names: list[str], max_logprobs: int, max_model_len: int):
        self.model, self.tokenizer = load_model(model).eval(), load_tokenizer(model)
        self.names, self.max_logprobs, self.max_model_len = names, max_logprobs, max_model_len
        self.root, self.created = str(resolve(model)), int(time.time())
        self.completions, self.fault, self.lock = 0, {"mode": None, "count": 0, "delay": 0.0}, threading.Lock()
        self.compute = threading.Lock()  # one forward at a time, like one engine

    def prompt_logprobs(self, seq: list[int], k: int, prefix: list[int] = ()) -> list:
        """vLLM's prompt_logprobs of `seq`, computed after `prefix` (a template the server added unasked)."""
        with torch.no_grad():
            logits_T_V = self.model(torch.tensor([[*prefix, *seq]])).logits[0, len(prefix):-1]
            lp_T_V = torch.log_softmax(logits_T_V.float(), -1)
        rows = [None]
        for t in range(len(seq) - 1):
            lp_V, token = lp_T_V[t], seq[t + 1]
            row = {token: (float(lp_V[token]), 1 + int((lp_V > lp_V[token]).sum()))}
            values, ids = lp_V.topk(k) if k else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
            row |= {int(i): (float(v), rank) for rank, (v, i) in enumerate(zip(values, ids), start=1)}
            rows.append({str(i): {"logprob": max(v, NEG_INF_JSON), "rank": r,
                                  "decoded_token": self.tokenizer.decode([i])} for i, (v, r) in row.items()})
        return rows

    def complete(self, body: dict, mode: str | None) -> dict:
        prompts, k = body["prompt"], body.get("prompt_logprobs")
        prefix = self.tokenizer(TEMPLATE)["input_ids"] if mode == "batch_template" and len(prompts) > 1 else []
        sampling = Sampling(greedy=True, max_new_tokens=body.get("max_tokens", 16))
        with self.compute:
            rollouts = HFRolloutEngine(self.model, self.tokenizer).generate(prompts, 1, sampling, seed=0)
            choices = []
            for index, (seq, r) in enumerate(zip(prompts, rollouts, strict=True)):
                echoed = seq[:-1] + [seq[-1] + 1] if mode == "bad_echo" else seq
                text = self.tokenizer.decode(r.completion_ids, skip_special_tokens=True)
                choices.append({"index": index, "text": text,
                                "logprobs": None, "finish_reason": r.finish_reason, "stop_reason": None,
                                "token_ids": r.completion_ids if body.get("return_token_ids") else None,
                                "prompt_logprobs": self.prompt_logprobs(seq, k, prefix) if k is not None else None,
                                "prompt_token_ids": echoed if body.get("return_token_ids") else None})
        generated = sum(len(r.completion_ids) for r in rollouts)
        prompt_tokens = sum(map(len, prompts))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": "someone-else" if mode == "wrong_model" else self.names[0], "choices": choices,
                "service_tier": None, "system_fingerprint": None, "kv_transfer_params": None,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + generated,
                          "completion_tokens": generated, "prompt_tokens_details": None}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--served-model-name", nargs="+", required=True)
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--max-model-len", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.app = App(args.model, args.served_model_name, args.max_logprobs, args.max_model_len)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
