"""Issue 13's features with the official `openai` client against a real `picochat serve smollm2` (fp32, so a
direct forward pass of picochat's model in this process is the oracle)."""
from __future__ import annotations

import math

import httpx
import pytest
import torch

from tests.serve.conftest import ServerProcess

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def smol_fp32(tmp_path_factory):
    srv = ServerProcess("smollm2", "--dtype", "fp32", "--max-context", "1024",
                        db=tmp_path_factory.mktemp("smol32") / "p.db")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(smol_fp32):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=smol_fp32.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model():
    from picochat.checkpoints.io import load_model
    m, tok, _ = load_model("smollm2", dtype=torch.float32)
    return m, tok


def test_logprobs_equal_a_direct_forward_pass(smol_fp32, client, model):
    m, tok = model
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=1.0, seed=11, max_tokens=16,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(math.isfinite(v) for v in tops)
        assert e.logprob <= tops[0] + 1e-6
    prompt = httpx.post(smol_fp32.url + "/tokenize", json={"messages": QUESTION}).json()["tokens"]
    index = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    ids = [index[bytes(e.bytes)] for e in content]
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([prompt + ids]))[0][0].float(), -1)
    want = [float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(ids)]
    assert max(abs(e.logprob - w) for e, w in zip(content, want)) < 1e-4
    # streamed, the same draws (same seed) carry the same logprobs
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=1.0, seed=11,
                                                 max_tokens=16, logprobs=True, top_logprobs=3, stream=True))
    joined = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in joined] == [e.token for e in content]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(joined, content)) < 1e-4
    # completions: the integer form
    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=3, temperature=0,
                                  logprobs=2)
    assert c.choices[0].logprobs.tokens[0] == " Paris" and c.choices[0].logprobs.token_logprobs[0] > math.log(0.3)


def test_langchain_chat_openai_invoke_and_stream(smol_fp32):
    """A second, independent client: whatever fields LangChain sends are honoured (none refused)."""
    lc = pytest.importorskip("langchain_openai")
    chat = lc.ChatOpenAI(base_url=smol_fp32.url + "/v1", api_key="unused", model="smollm2", temperature=0,
                         max_tokens=24, max_retries=0)
    answer = chat.invoke("What is the capital of France?")
    assert "Paris" in answer.content and answer.response_metadata["finish_reason"] == "stop"
    streamed = "".join(c.content for c in chat.stream("What is the capital of France?"))
    assert streamed == answer.content
    scored = chat.bind(logprobs=True, top_logprobs=2).invoke("What is the capital of France?")
    assert len(scored.response_metadata["logprobs"]["content"]) == scored.usage_metadata["output_tokens"]


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                         "country": {"type": "string", "maxLength": 40},
                                         "population_millions": {"type": "number", "minimum": 0, "maximum": 100}},
        "required": ["city", "country", "population_millions"], "additionalProperties": False}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30},
                                                       "minItems": 1, "maxItems": 3}},
          "required": ["name", "age", "hobbies"], "additionalProperties": False}
VERDICT = {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                            "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
           "required": ["sentiment", "confidence"], "additionalProperties": False}
PROMPTS = [("Tell me about Paris.", CITY), ("Which city is the capital of Japan?", CITY),
           ("Describe the largest city in Brazil.", CITY), ("What is a big city in Kenya?", CITY),
           ("Name a city in Canada.", CITY), ("Invent a person who likes sports.", PERSON),
           ("Describe a retired teacher.", PERSON), ("Make up a young painter.", PERSON),
           ("Describe Ada Lovelace.", PERSON), ("Invent a chef from Italy.", PERSON),
           ("Review: I loved this film, the acting was superb.", VERDICT),
           ("Review: The food was cold and the waiter was rude.", VERDICT),
           ("Review: It was fine, nothing special.", VERDICT), ("Review: Best purchase I ever made!", VERDICT),
           ("Review: The battery died after two days.", VERDICT),
           # json_object: any object; as OpenAI's docs ask, the prompt says which (a loose prompt lets a small model
           # add keys until max_tokens: finish_reason "length", cut JSON, as at OpenAI)
           ("Give me a JSON object describing a cat, with keys name and colour.", None),
           ("Return a JSON object with a key fruits holding a list of three fruits.", None),
           ("Answer in JSON with a key answer: what is 2 + 2?", None),
           ("Describe today's weather as a JSON object with keys sky and temperature.", None),
           ("Make a JSON object for a book with a title and an author.", None)]


def test_structured_outputs_always_parse_and_validate(client):
    """20 varied prompts, json_schema (3 schemas) and json_object, sent at once (the server batches them):
    every answer parses and validates."""
    import json
    from concurrent.futures import ThreadPoolExecutor
    import jsonschema_rs

    def ask(item):
        prompt, schema = item
        fmt = {"type": "json_object"} if schema is None else \
            {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=300, response_format=fmt)
        return r.choices[0]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, PROMPTS))
    for (prompt, schema), a in zip(PROMPTS, answers):
        assert a.finish_reason == "stop", (prompt, a.message.content)
        value = json.loads(a.message.content)
        assert isinstance(value, dict) and (schema is None or jsonschema_rs.is_valid(schema, value)), (prompt, value)
    # the SDK's own helper: a pydantic model as the schema, parsed back
    pydantic = pytest.importorskip("pydantic")

    class Capital(pydantic.BaseModel):
        city: str
        country: str
    parsed = client.chat.completions.parse(model="smollm2", response_format=Capital, temperature=0, max_tokens=60,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in parsed.choices[0].message.parsed.city


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_tool_calls_forced_streamed_and_answered(client):
    import json
    import jsonschema_rs
    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    schema = WEATHER_TOOL["function"]["parameters"]
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        # (parallel calls off: SmolLM2, not tuned for tools, would repeat the call until max_tokens)
        r = client.chat.completions.create(model="smollm2", messages=ask, tools=[WEATHER_TOOL], tool_choice=choice,
                                           temperature=0, max_tokens=80, parallel_tool_calls=False)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        assert jsonschema_rs.is_valid(schema, args) and "Paris" in args["city"]
    stream = client.chat.completions.create(model="smollm2", messages=ask, tools=[WEATHER_TOOL], tool_choice="required",
                                            temperature=0, max_tokens=80, stream=True, parallel_tool_calls=False)
    name, arguments, finish = None, "", None
    for chunk in stream:
        for d in chunk.choices[0].delta.tool_calls or []:
            name = d.function.name or name
            arguments += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, arguments) == (call.function.name, call.function.arguments) and finish == "tool_calls"
    # the result goes back as a tool message and is answered in text
    history = ask + [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    # (tool_choice "none": answer now; under "auto" SmolLM2, not tuned for tools, calls the tool again)
    answer = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER_TOOL], temperature=0,
                                            max_tokens=60, tool_choice="none")
    text = answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop" and "21" in text, text


def test_langchain_bind_tools_and_structured_output(smol_fp32):
    lc = pytest.importorskip("langchain_openai")
    pydantic = pytest.importorskip("pydantic")
    chat = lc.ChatOpenAI(base_url=smol_fp32.url + "/v1", api_key="unused", model="smollm2", temperature=0,
                         max_tokens=80, max_retries=0)

    class GetWeather(pydantic.BaseModel):
        """Get the current weather in a city."""
        city: str

    msg = chat.bind_tools([GetWeather], tool_choice="GetWeather").invoke("What is the weather in Rome?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "GetWeather" and "Rome" in msg.tool_calls[0]["args"]["city"]

    class Capital(pydantic.BaseModel):
        city: str
        country: str
    got = chat.with_structured_output(Capital).invoke("What is the capital of France?")
    assert isinstance(got, Capital) and got.city and got.country  # (the schema is ours to keep; the facts, the model's)


def test_responses_chain_across_a_server_restart(tmp_path):
    """client.responses: the second response, chained by previous_response_id after the server restarted on
    the same database, sees the earlier turn; GET and DELETE through the SDK; a missing id is a 400."""
    openai = pytest.importorskip("openai")
    db = tmp_path / "r.db"
    srv = ServerProcess("smollm2", "--dtype", "fp32", "--max-context", "1024", db=db)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        first = c.responses.create(model="smollm2", input="My favourite colour is blue.", temperature=0, max_output_tokens=12)
        assert first.status in ("completed", "incomplete") and first.output_text  # (SmolLM2 may ramble on)
    finally:
        srv.stop()
    srv = ServerProcess("smollm2", "--dtype", "fp32", "--max-context", "1024", db=db)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        second = c.responses.create(model="smollm2", input="What is my favourite colour?", previous_response_id=first.id,
                                    temperature=0, max_output_tokens=40)
        # the model read the whole conversation: its prompt is exactly the two turns'
        conv = [{"role": "user", "content": "My favourite colour is blue."}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "What is my favourite colour?"}]
        assert second.usage.input_tokens == httpx.post(srv.url + "/tokenize", json={"messages": conv}).json()["count"]
        assert "blue" in second.output_text.lower(), second.output_text
        streamed = "".join(e.delta for e in c.responses.create(model="smollm2", input="What is my favourite colour?",
                                                               previous_response_id=first.id, temperature=0,
                                                               max_output_tokens=40, stream=True)
                           if e.type == "response.output_text.delta")
        assert streamed == second.output_text
        assert c.responses.retrieve(second.id).output_text == second.output_text
        c.responses.delete(second.id)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(second.id)
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="smollm2", input="x", previous_response_id=second.id)
        assert "previous_response_id" in str(e.value)
    finally:
        srv.stop()
