"""schemathesis against the whole app's /openapi.json: every route, generated bodies, no 5xx ever."""
from __future__ import annotations

import pytest

from picochat.serve.app import create_app
from picochat.serve.hosts import load_host
from picochat.serve.store import Store


@pytest.mark.slow
def test_no_route_answers_5xx(tiny_chat_ckpt, tmp_path):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from fastapi.testclient import TestClient

    # a short context keeps every generated request's generation short
    host = load_host(str(tiny_chat_ckpt), dtype="fp32", max_batch=4, max_context=64)
    store = Store(tmp_path / "fuzz.db")
    app = create_app([host], store=store, default_max_tokens=16)
    cid = store.create_conversation(model=host.id)["id"]
    u = store.add_message(cid, role="user", content="q")
    a = store.add_message(cid, role="assistant", content="a", parent_id=u["id"])
    real = {"conversation_id": cid, "message_id": str(a["id"])}
    failures, calls, routes = [], [], set()
    with TestClient(app):  # runs the lifespan: the scheduler thread is up
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        for op in schema.get_all_operations():
            op = op.ok()
            routes.add(f"{op.method.upper()} {op.path}")

            @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(op.as_strategy())
            def run(case):
                params = case.path_parameters or {}
                if len(calls) % 2:
                    params.update({k: v for k, v in real.items() if k in params})
                response = case.call()
                calls.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((case.method, case.formatted_path, case.body, response.text[:300]))

            run()
    store.close()
    assert failures == []
    for route in ("POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health",
                  "GET /metrics", "GET /api/conversations", "POST /api/rankings", "POST /v1/responses",
                  "GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}", "POST /tokenize",
                  "POST /detokenize"):
        assert route in routes
    assert any(c == 200 for c in calls) and any(400 <= c < 500 for c in calls)
