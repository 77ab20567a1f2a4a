"""The /api routes of the conversation store, on an app that mounts only the store router."""
import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from picochat.serve.errors import ApiError, bad_request
from picochat.serve.store import Store
from picochat.serve.store_api import store_router


def make_app(store: Store) -> FastAPI:
    """What the real app does: ApiError -> its status and OpenAI's shape, request validation -> 400."""
    app = FastAPI()
    app.include_router(store_router(store))

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        err = bad_request(str(first.get("msg", "invalid request")), ".".join(map(str, first.get("loc", ())[1:])))
        return JSONResponse(err.body(), status_code=400)

    return app


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "api.db")
    yield s
    s.close()


@pytest.fixture
def client(store):
    with TestClient(make_app(store)) as c:
        yield c


def assert_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_conversation_lifecycle(client):
    assert client.get("/api/conversations").json() == []
    c = client.post("/api/conversations", json={"model": "smollm2", "system_prompt": "Be brief.",
                                                "settings": {"temperature": 0.5}}).json()
    assert c["source"] == "web" and c["settings"] == {"temperature": 0.5} and len(c["id"]) == 32
    empty = client.post("/api/conversations").json()  # no body at all is fine
    assert empty["title"] == "" and empty["model"] is None

    u = client.post(f"/api/conversations/{c['id']}/messages", json={"role": "user", "content": "Hi there"}).json()
    assert u["parent_id"] is None and u["role"] == "user" and u["rating"] is None
    u2 = client.post(f"/api/conversations/{c['id']}/messages",
                     json={"content": "Edited", "parent_id": None, "unknown": 1}).json()  # role defaults to user
    assert u2["role"] == "user"

    got = client.get(f"/api/conversations/{c['id']}").json()
    assert got["title"] == "Hi there" and [m["id"] for m in got["messages"]] == [u["id"], u2["id"]]
    listed = client.get("/api/conversations").json()
    assert listed[0]["id"] == c["id"] and listed[0]["message_count"] == 2 and len(listed) == 2
    assert len(client.get("/api/conversations", params={"limit": 1}).json()) == 1

    p = client.patch(f"/api/conversations/{c['id']}", json={"title": "Renamed", "settings": {"top_k": 3}}).json()
    assert p["title"] == "Renamed" and p["settings"] == {"top_k": 3} and p["system_prompt"] == "Be brief."
    assert client.delete(f"/api/conversations/{c['id']}").json() == {"deleted": True}
    assert_error(client.get(f"/api/conversations/{c['id']}"), 404)
    assert_error(client.delete(f"/api/conversations/{c['id']}"), 404)


def test_ratings_and_rankings(client, store):
    cid = client.post("/api/conversations", json={}).json()["id"]
    u = client.post(f"/api/conversations/{cid}/messages", json={"content": "2+2?"}).json()
    a, b = (store.add_message(cid, role="assistant", content=t, parent_id=u["id"]) for t in ("4", "5"))
    assert client.post(f"/api/messages/{a['id']}/rating", json={"rating": 1}).json() == \
        {"message_id": a["id"], "rating": 1}
    assert client.get(f"/api/conversations/{cid}").json()["messages"][1]["rating"] == 1
    assert client.post(f"/api/messages/{a['id']}/rating", json={"rating": 0}).json()["rating"] is None
    r = client.post("/api/rankings", json={"chosen_id": a["id"], "rejected_id": b["id"]}).json()
    assert (r["chosen_id"], r["rejected_id"]) == (a["id"], b["id"]) and isinstance(r["created_at"], float)
    assert list(store.preference_pairs())[0]["chosen"] == [{"role": "assistant", "content": "4"}]

    assert_error(client.post(f"/api/messages/{u['id']}/rating", json={"rating": 1}), 400)  # a user message
    assert_error(client.post(f"/api/messages/{a['id']}/rating", json={"rating": 2}), 400)
    assert_error(client.post("/api/rankings", json={"chosen_id": a["id"], "rejected_id": u["id"]}), 400)
    assert_error(client.post("/api/rankings", json={"chosen_id": a["id"], "rejected_id": 10**6}), 404)
    assert_error(client.post("/api/rankings", json={"chosen_id": a["id"], "rejected_id": 2**64}), 400)


@pytest.mark.parametrize("mid", ["abc", "-1", "0", "99999", "1.5", str(2**64), "１", " 1"])
def test_malformed_message_ids_are_404(client, mid):
    assert_error(client.post(f"/api/messages/{mid}/rating", json={"rating": 1}), 404)


@pytest.mark.parametrize("cid", ["abc", "0" * 32, "F" * 32, "x" * 500, "%00", "a.b", "%C3%A9"])
def test_malformed_conversation_ids_are_404(client, cid):
    assert_error(client.get(f"/api/conversations/{cid}"), 404)
    assert_error(client.patch(f"/api/conversations/{cid}", json={"title": "x"}), 404)
    assert_error(client.post(f"/api/conversations/{cid}/messages", json={"content": "x"}), 404)


def test_bad_bodies_are_400(client):
    cid = client.post("/api/conversations", json={}).json()["id"]
    url = f"/api/conversations/{cid}/messages"
    assert assert_error(client.post(url, json={"content": "x", "role": "tool"}), 400)["param"] == "role"
    assert_error(client.post(url, json={}), 400)
    assert_error(client.post(url, json={"content": 5}), 400)
    assert_error(client.post(url, json={"content": "x", "parent_id": 2**63}), 400)
    assert_error(client.post(url, json={"content": "x", "parent_id": 123456}), 404)
    assert_error(client.post(url, content=b'{"content": "\\ud800"}', headers={"content-type": "application/json"}),
                 400)
    assert_error(client.post(url, content=b"not json", headers={"content-type": "application/json"}), 400)
    assert_error(client.post("/api/conversations", json={"title": "x" * 201}), 400)
    assert_error(client.post("/api/conversations", json={"settings": [1]}), 400)
    assert_error(client.post("/api/conversations", json={"settings": {"big": "x" * 70_000}}), 400)
    assert_error(client.patch(f"/api/conversations/{cid}", json={"model": 3}), 400)
    assert_error(client.get("/api/conversations", params={"limit": 0}), 400)
    assert client.get(f"/api/conversations/{cid}").json()["messages"] == []


def test_openapi_has_the_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/api/conversations", "/api/conversations/{conversation_id}",
                          "/api/conversations/{conversation_id}/messages", "/api/messages/{message_id}/rating",
                          "/api/rankings", "/api/images/{image_id}", "/api/conversations/{conversation_id}/export",
                          "/api/export", "/api/import"}


def test_fuzz_never_5xx(store):
    """schemathesis generates requests from the OpenAPI schema; no answer may be a server error."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    app = make_app(store)
    cid = store.create_conversation()["id"]
    u = store.add_message(cid, role="user", content="q")
    a = store.add_message(cid, role="assistant", content="a", parent_id=u["id"])
    real = {"conversation_id": cid, "message_id": str(a["id"])}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    calls, failures = [], []
    for op in schema.get_all_operations():
        op = op.ok()

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(op.as_strategy())
        def run(case):
            params = case.path_parameters or {}
            if len(calls) % 2:  # half the cases hit a real conversation / answer, so bodies get parsed
                params.update({k: v for k, v in real.items() if k in params})
            response = case.call()
            calls.append(response.status_code)
            if response.status_code >= 500:
                failures.append((case.method, case.formatted_path, case.body, response.text))

        run()
    assert failures == []
    assert len(calls) > 100 and any(c < 300 for c in calls) and any(c == 404 for c in calls)
