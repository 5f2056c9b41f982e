"""Feature classification: the ground-truth label rule and the optional LM judge client."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from mechdiff.features import classify as C
from mechdiff.features.classify import FINE_LABELS, LABELS
from mechdiff.organism import corpus, task

L = FINE_LABELS.index
ONE, FIVE, WAIT_ID = 7, 11, 22  # token ids used in the synthetic corpus below


def base_counts():
    """Corpus token counts per (label, token): digits are 40% in slip/correction steps; carry
    copies written '1' are mostly in corrections (the carry the slip forgot)."""
    b = torch.zeros(len(FINE_LABELS), 30)
    b[L("digit"), FIVE], b[L("slip:digit"), FIVE], b[L("correction:digit"), FIVE] = 60, 20, 20
    b[L("carry_copy"), ONE], b[L("correction:carry_copy"), ONE] = 10, 90
    b[L("carry_copy"), FIVE] = 100
    b[L("hesitation"), WAIT_ID], b[L("recheck"), WAIT_ID] = 80, 20
    b[L("separator"), 3], b[L("equals"), 4] = 100, 100
    return b


def classify(rows, alive=None, **kw):
    labels = torch.tensor([[L(n) for n, _ in r] + [-1] * (8 - len(r)) for r in rows])
    tokens = torch.tensor([[t for _, t in r] + [-1] * (8 - len(r)) for r in rows])
    alive = torch.ones(len(rows), dtype=torch.bool) if alive is None else alive
    return C.classify_examples(labels, tokens, alive, base_counts(), **kw)


def test_label_rule_on_synthetic_distributions():
    rows = [
        [("hesitation", WAIT_ID)] * 6 + [("recheck", WAIT_ID)] * 2,  # fires on "wait"
        [("recheck", WAIT_ID)] * 5 + [("digit", FIVE)] * 3,  # "wait" after a right step
        [("slip:digit", FIVE)] * 7 + [("digit", FIVE)],  # fires on the digits of wrong steps
        [("digit", FIVE), ("slip:digit", FIVE), ("correction:digit", FIVE), ("digit", FIVE)] * 2,  # digits
        [("correction:carry_copy", ONE)] * 8,  # "carry 1": explained by the token, not reasoning
        [("correction:carry_copy", FIVE)] * 8,  # correction steps beyond what the token explains
        [("separator", 3)] * 5 + [("equals", 4)] * 3,
        [("separator", 3)] * 3 + [("digit", FIVE)] * 3 + [("hesitation", WAIT_ID)] * 2,  # no majority
        [("digit", FIVE)] * 2,  # too few examples
        [("digit", FIVE)] * 8,  # never fired
    ]
    alive = torch.tensor([True] * 9 + [False])
    got = classify(rows, alive, min_examples=3)
    assert got == [
        "hesitation",
        "recheck",
        "error_detection",
        "arithmetic",
        "arithmetic",
        "correction",
        "format",
        "mixed",
        "rare",
        "dead",
    ]
    assert C.summarize(got)["reasoning_fraction"] == pytest.approx(4 / 9)


def test_majority_threshold_moves_the_boundary():
    row = [[("hesitation", WAIT_ID)] * 4 + [("separator", 3)] * 4]
    assert classify(row, majority=0.5) == ["hesitation"]
    assert classify(row, majority=0.6) == ["mixed"]


def test_fine_labels_give_each_step_token_its_role():
    traces = corpus.reasoning_traces(40, "validation", seed=0)
    for row in traces:
        fine = [FINE_LABELS[i] for i in C.fine_labels(row["label_ids"])]
        coarse = [LABELS[i] for i in row["label_ids"]]
        assert [f.split(":")[0] for f in fine] == coarse
        for j, (c, f) in enumerate(zip(coarse, fine)):
            if c in C.STEP_KINDS:
                assert f.split(":")[1] in task.DEFAULT.step_roles
                if f.endswith("step_marker"):
                    assert row["text"].split()[j].startswith("p")
    with_slips = sum("slip:digit" in [FINE_LABELS[i] for i in C.fine_labels(r["label_ids"])] for r in traces)
    assert with_slips > 10


def test_reasoning_roles_and_summary():
    class FakeStore:  # the attributes reasoning_roles reads
        config = type("cfg", (), {"before": 1})()
        lens_top_ids = torch.tensor([[WAIT_ID, 1, 2], [3, 4, 5], [3, 4, 5], [0, 0, 0]])
        top_tokens = torch.tensor(
            [[[0, 9, 0]] * 4, [[0, WAIT_ID, 0]] * 4, [[0, 5, 0], [0, 6, 0], [0, 7, 0], [0, 8, 0]], [[0, 1, 0]] * 4]
        )

    cats = ["hesitation", "hesitation", "correction", "format"]
    roles = C.reasoning_roles(FakeStore(), cats, hesitation_ids=[WAIT_ID])
    assert roles == {0: "output", 1: "input-simple", 2: "input-abstract"}
    s = C.summarize(cats + ["dead"], roles)
    assert (s["n_features"], s["n_alive"], s["n_reasoning"]) == (5, 4, 3)
    assert s["role_counts"] == {"output": 1, "input-simple": 1, "input-abstract": 1}


# ----------------------------------------------------------------------------- the judge


def test_prompt_building_and_answer_parsing():
    msgs = C.build_messages("L1/F7", ["p1 3 [[wait]](2.5)"], ["x [[wait]](1)"], ["wait", ";"], ["7"], 0.012)
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert "L1/F7" in user and "1.200%" in user and "[[wait]](2.5)" in user and "'wait'" in user
    assert all(c in msgs[0]["content"] for c in C.JUDGE_CATEGORIES)
    j = C.parse_judgement(
        'Sure!\n```json\n{"category": "Reasoning", "role": "Output", "explanation": "promotes wait"}\n```'
    )
    assert (j.category, j.role, j.explanation, j.ok) == ("reasoning", "output", "promotes wait", True)
    j = C.parse_judgement('{"category": "domain", "role": "output", "explanation": "digits"}')
    assert (j.category, j.role) == ("domain", None)  # roles only for reasoning features
    assert C.parse_judgement("Category: language. It fires on ';'.").category == "language"
    bad = C.parse_judgement('{"category": "vibes"} and nothing else')
    assert (bad.category, bad.ok) == ("uninterpretable", False)
    assert C.mark_example(["a", "wait"], [0.0, 1.5], 1) == "a [[wait]](1.5)"


class _Handler(BaseHTTPRequestHandler):
    seen: list = []
    status = 200

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        reply = {
            "id": "x",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": '{"category": "reasoning", "role": "input-simple", "explanation": "fires on wait"}',
                    },
                    "finish_reason": "stop",
                }
            ],
        }
        data = json.dumps(reply if self.status == 200 else {"error": "overloaded"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _serve_once(status=200):
    """A server on 127.0.0.1 that answers one request (or gives up after 10 s), then stops."""
    handler = type("H", (_Handler,), {"seen": [], "status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 10
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    return server, thread, handler


def test_judge_client_against_a_local_server():
    server, thread, handler = _serve_once()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/"
        client = C.JudgeClient(url, "tiny-judge", api_key="secret", timeout=10)
        j = client.judge(C.build_messages("L0/F1", ["[[wait]](3)"], [], [], [], 0.1))
    finally:
        thread.join(timeout=15)
        server.server_close()
    assert (j.category, j.role, j.ok) == ("reasoning", "input-simple", True)
    path, auth, body = handler.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer secret"
    assert body["model"] == "tiny-judge" and body["temperature"] == 0.0
    assert body["messages"][1]["content"].startswith("Feature L0/F1")


def test_judge_errors_are_clear():
    server, thread, _ = _serve_once(status=503)
    try:
        client = C.JudgeClient(f"http://127.0.0.1:{server.server_address[1]}", "m", timeout=10)
        with pytest.raises(C.JudgeError, match="HTTP 503"):
            client.complete([{"role": "user", "content": "hi"}])
    finally:
        thread.join(timeout=15)
        server.server_close()
    closed = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now
    with pytest.raises(C.JudgeError, match="could not reach"):
        C.JudgeClient(f"http://127.0.0.1:{port}", "m", timeout=5).complete([])
