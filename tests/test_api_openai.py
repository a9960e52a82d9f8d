"""The OpenAI-compatible API as clients use it: every endpoint and option through the official ``openai`` client
against a live server on the tiny random LLaMA (greedy, 12 new tokens unless a test scripts the answer)."""

from __future__ import annotations

import httpx
import openai
import pytest

from qtune.serve.api import CHAT_FIELDS, COMPLETION_FIELDS, MESSAGE_FIELDS
from qtune.serve.engine import GenerationSettings, StreamState
from qtune.serve.session import fit_messages

from serve_fixtures import FILLER, GREEDY, INDENTED, scripted

HI = [{"role": "user", "content": "Write a loop."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def generated(engine, prompt_ids: list[int], settings: GenerationSettings = GREEDY) -> tuple[str, StreamState]:
    """What the engine itself answers to ``prompt_ids``: (text, state with the token counts)."""
    state = StreamState()
    text = "".join(engine.stream(prompt_ids, settings, state))
    return text, state


def usage_of(state: StreamState) -> dict:
    return {
        "prompt_tokens": state.prompt_tokens,
        "completion_tokens": state.completion_tokens,
        "total_tokens": state.prompt_tokens + state.completion_tokens,
    }


def bad_request(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400
    return e.value


# ---- models -----------------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client, engine):
    assert [m.id for m in client.models.list().data] == [engine.name]
    model = client.models.retrieve(engine.name)
    assert (model.id, model.object, model.owned_by) == (engine.name, "model", "qtune")
    for unknown in ("gpt-4o", "org/some-model"):
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve(unknown)
        assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
        assert e.value.body["message"] == f"model {unknown!r} not found: this server serves {engine.name!r} only"


# ---- chat completions: usage --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_usage_is_exact_and_the_streamed_usage_chunk_equals_it(client, engine):
    expected_text, state = generated(engine, engine.encode(engine.chat_prompt(HI)))
    whole = client.chat.completions.create(model=engine.name, messages=HI)
    assert whole.choices[0].message.content == expected_text
    assert whole.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == usage_of(state)
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"

    chunks = list(
        client.chat.completions.create(
            model=engine.name, messages=HI, stream=True, stream_options={"include_usage": True}
        )
    )
    *answer, last = chunks
    assert last.choices == [] and last.usage == whole.usage  # OpenAI's layout: usage last, with no choices
    assert all(c.usage is None for c in answer)
    assert "".join(c.choices[0].delta.content or "" for c in answer) == expected_text
    assert answer[-1].choices[0].finish_reason == "length"

    plain = list(client.chat.completions.create(model=engine.name, messages=HI, stream=True))
    assert all(c.usage is None and len(c.choices) == 1 for c in plain)  # no usage chunk unless asked for
    off = list(
        client.chat.completions.create(
            model=engine.name, messages=HI, stream=True, stream_options={"include_usage": False}
        )
    )
    assert len(off) == len(plain) and all(c.usage is None for c in off)


@pytest.mark.slow
def test_usage_counts_the_fitted_prompt_and_every_generated_token(client, engine):
    tok = engine.tokenizer
    with scripted(engine, INDENTED):
        r = client.chat.completions.create(model=engine.name, messages=HI)
    answer_tokens = len(tok(INDENTED, add_special_tokens=False)["input_ids"])
    assert r.choices[0].message.content == INDENTED and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == answer_tokens + 1  # the answer's tokens and the EOS that ended it

    # a conversation longer than the context: usage counts the prompt sent (old turns left out), not the request
    settings = GenerationSettings(max_new_tokens=64)
    filler = " ".join(["word"] * 60)
    messages = [{"role": "system", "content": "You write Python."}]
    for i in range(6):
        messages += [
            {"role": "user", "content": f"question {i}: {filler}"},
            {"role": "assistant", "content": f"answer {i}: {filler}"},
        ]
    messages.append({"role": "user", "content": "last question"})
    fitted = fit_messages(engine, messages, settings)
    assert fitted.dropped >= 2
    raw = client.chat.completions.with_raw_response.create(model=engine.name, messages=messages, max_tokens=64)
    assert raw.headers["X-Qtune-Dropped-Turns"] == str(fitted.dropped)
    _, state = generated(engine, fitted.prompt_ids, settings)
    assert raw.parse().usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == usage_of(
        state
    )
    assert state.prompt_tokens == len(fitted.prompt_ids)


# ---- chat completions: messages ---------------------------------------------------------------------------------


def test_developer_is_the_system_role(client, engine):
    system = [{"role": "system", "content": "You write Python."}, HI[0]]
    developer = [{"role": "developer", "content": "You write Python."}, HI[0]]
    expected_text, state = generated(engine, engine.encode(engine.chat_prompt(system)))
    r = client.chat.completions.create(model=engine.name, messages=developer)
    assert r.choices[0].message.content == expected_text and r.usage.prompt_tokens == state.prompt_tokens
    # and the system text really is in the prompt: another one gives another prompt length
    other = client.chat.completions.create(
        model=engine.name,
        messages=[{"role": "developer", "content": "You write Python and explain every line of it."}, HI[0]],
    )
    assert other.usage.prompt_tokens > r.usage.prompt_tokens


@pytest.mark.parametrize(
    "messages, param, message",
    [
        (
            [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "q"}],
            "messages[1]",
            "messages[1]: a second system message; qtune takes one system (or developer) message, as the first message",
        ),
        (
            [
                {"role": "developer", "content": "a"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "x"},
                {"role": "system", "content": "b"},
                {"role": "user", "content": "q"},
            ],
            "messages[3]",
            "messages[3]: a second system message; qtune takes one system (or developer) message, as the first message",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "developer", "content": "a"}],
            "messages[1]",
            "messages[1]: a system (or developer) message must be the first message",
        ),
        (
            [
                {"role": "system", "content": "a"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "x"},
                {"role": "assistant", "content": "y"},
                {"role": "user", "content": "q"},
            ],
            "messages[3].role",
            "messages[3].role: expected role 'user' (an optional system message first, then user and "
            "assistant alternating), got 'assistant'",
        ),
        (
            [
                {"role": "system", "content": "a"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "x"},
            ],
            "messages[2].role",
            "messages[2].role: a conversation must end with a user message, got 'assistant'",
        ),
        (
            [{"role": "system", "content": "a"}],
            "messages",
            "messages: a conversation needs a user message after the system message",
        ),
        (
            [
                {"role": "system", "content": "a"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": "x"}}],
                },
            ],
            "messages[1].content[1].type",
            'messages[1].content[1].type: only text parts are supported (qtune serves a text model), got "image_url"',
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None},
                {"role": "user", "content": "q"},
            ],
            "messages[1].content",
            "messages[1].content: expected a string or a list of text parts, got null",
        ),
        (
            [{"role": "user", "content": "q", "name": "ada"}],
            "messages[0].name",
            "messages[0].name: not supported by qtune (participant names); leave it out",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "tool", "content": "x", "tool_call_id": "1"}],
            "messages[1].role",
            "messages[1].role: 'tool' messages are not supported (qtune has no tool calling); "
            "expected 'system', 'developer', 'user' or 'assistant'",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}],
            "messages[1].role",
            "messages[1].role: expected 'system', 'developer', 'user' or 'assistant', got \"robot\"",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "q", "cache": True}]}],
            "messages[0].content[0].cache",
            "messages[0].content[0].cache: unrecognized request argument (qtune accepts text, type)",
        ),
    ],
)
def test_message_errors_name_the_exact_index_in_the_request(client, engine, messages, param, message):
    e = bad_request(lambda: client.chat.completions.create(model=engine.name, messages=messages))
    assert e.param == param and e.body["message"] == message


def test_text_parts_are_joined_and_invalid_unicode_is_named_by_index(client, server, engine):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Write "}, {"type": "text", "text": "a loop."}]}]
    expected_text, _ = generated(engine, engine.encode(engine.chat_prompt(HI)))
    assert client.chat.completions.create(model=engine.name, messages=parts).choices[0].message.content == expected_text
    body = (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
        '{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}'
    )
    r = httpx.post(f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "messages[2].content[0].text: not valid Unicode (a lone surrogate escape)",
        "type": "invalid_request_error",
        "param": "messages[2].content[0].text",
        "code": None,
    }
    r = httpx.post(
        f"{server}/v1/chat/completions",
        content='{"messages": [{"role": "user", "content": "q"}], "stop": ["ok", "\\udc00"]}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop[1]"


# ---- fields qtune does not support -------------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
UNSUPPORTED_CHAT = {
    "tools": [TOOL],
    "tool_choice": "auto",
    "functions": [TOOL["function"]],
    "function_call": "auto",
    "parallel_tool_calls": True,
    "response_format": {"type": "json_object"},
    "logprobs": True,
    "top_logprobs": 2,
    "n": 2,
    "logit_bias": {"1": 5},
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "verbosity": "low",
    "web_search_options": {},
}


def test_every_chat_field_is_supported_ignored_or_rejected():
    """The tables cover every field of the installed client's ``chat.completions.create`` and
    ``completions.create``, and each rejected field is tried below."""
    import inspect

    transport = {"extra_headers", "extra_query", "extra_body", "timeout"}

    def fields(method):
        return set(inspect.signature(method).parameters) - transport

    c = openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="unused")
    for table, method in ((CHAT_FIELDS, c.chat.completions.create), (COMPLETION_FIELDS, c.completions.create)):
        ours = {*table.supported, *table.ignored, *table.rejected}
        assert fields(method) <= ours, fields(method) - ours
    assert set(UNSUPPORTED_CHAT) | {"moderation"} == set(CHAT_FIELDS.rejected)
    assert set(UNSUPPORTED_COMPLETION) == set(COMPLETION_FIELDS.rejected)
    assert {"name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio"} == set(MESSAGE_FIELDS.rejected)


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_CHAT))
def test_each_unsupported_chat_field_is_a_400_naming_it(client, engine, field):
    e = bad_request(
        lambda: client.chat.completions.create(model=engine.name, messages=HI, **{field: UNSUPPORTED_CHAT[field]})
    )
    assert e.param == field and e.code == "unsupported_parameter"
    assert e.body["message"].startswith(f"{field}: not supported by qtune (")


def test_unsupported_messages_say_what_to_send_instead(client, engine):
    e = bad_request(lambda: client.chat.completions.create(model=engine.name, messages=HI, n=3))
    assert e.body["message"] == "n: not supported by qtune (one choice per request); leave it out or send 1"
    e = bad_request(lambda: client.chat.completions.create(model=engine.name, messages=HI, tools=[TOOL]))
    assert e.body["message"] == "tools: not supported by qtune (tool calling); leave it out or send []"
    e = bad_request(
        lambda: client.chat.completions.create(
            model=engine.name,
            messages=HI,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        )
    )
    assert e.body["message"] == (
        "response_format: not supported by qtune (structured output: JSON mode, JSON "
        'schema); leave it out or send {"type": "text"}'
    )


def test_values_that_ask_for_nothing_and_ignored_fields_are_accepted(client, engine):
    expected_text, _ = generated(engine, engine.encode(engine.chat_prompt(HI)))
    neutral = dict(
        n=1,
        tools=[],
        tool_choice="none",
        functions=[],
        logprobs=False,
        top_logprobs=0,
        logit_bias={},
        presence_penalty=0,
        frequency_penalty=0.0,
        response_format={"type": "text"},
        modalities=["text"],
        user="ada",
        metadata={"k": "v"},
        store=True,
        service_tier="auto",
        safety_identifier="x",
        prompt_cache_key="k",
        seed=7,
    )
    r = client.chat.completions.create(model=engine.name, messages=HI, **neutral)
    assert r.choices[0].message.content == expected_text


def test_unknown_fields_and_mistyped_fields_are_a_400_naming_them(client, engine):
    e = bad_request(lambda: client.chat.completions.create(model=engine.name, messages=HI, extra_body={"top_k": 5}))
    assert e.param == "top_k" and e.code == "unknown_parameter"
    assert e.body["message"] == (
        "top_k: unrecognized request argument (qtune accepts max_completion_tokens, max_tokens, messages, metadata, "
        "model, prompt_cache_key, prompt_cache_options, prompt_cache_retention, repetition_penalty, "
        "safety_identifier, seed, service_tier, stop, store, stream, stream_options, temperature, top_p, user)"
    )
    e = bad_request(
        lambda: client.chat.completions.create(
            model=engine.name, messages=HI, extra_body={"stream_options": {"include_usage": True}}
        )
    )
    assert e.param == "stream_options" and e.body["message"] == "stream_options: only allowed with stream: true"
    e = bad_request(
        lambda: client.chat.completions.create(
            model=engine.name, messages=HI, stream=True, stream_options={"include_usage": True, "extra": 1}
        )
    )
    assert e.param == "stream_options.extra"
    e = bad_request(lambda: client.chat.completions.create(model=engine.name, messages=HI, max_tokens="5"))
    assert e.param == "max_tokens" and e.body["message"] == "max_tokens: Input should be a valid integer"
    e = bad_request(lambda: client.chat.completions.create(model=engine.name, messages=HI, stop=5))
    assert e.param == "stop" and e.body["message"] == "stop: expected a string or a list of strings, got a number"


def test_seed_is_accepted_with_greedy_decoding_and_rejected_with_sampling(client, engine):
    expected_text, _ = generated(engine, engine.encode(engine.chat_prompt(HI)))
    r = client.chat.completions.create(model=engine.name, messages=HI, seed=1, temperature=0)
    assert r.choices[0].message.content == expected_text
    e = bad_request(lambda: client.chat.completions.create(model=engine.name, messages=HI, seed=1, temperature=0.7))
    assert e.param == "seed" and e.code == "unsupported_parameter"
    assert e.body["message"].startswith("seed: not supported with sampling (temperature > 0)")


# ---- completions ------------------------------------------------------------------------------------------------

PROMPT = "def add(a, b):\n    "


@pytest.mark.slow
def test_completions_continue_the_prompt_streamed_and_not(client, engine):
    ids = engine.encode(PROMPT)
    expected_text, state = generated(engine, ids)
    r = client.completions.create(model=engine.name, prompt=PROMPT)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == expected_text and r.choices[0].finish_reason == "length"
    assert r.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == usage_of(state)
    assert r.usage.prompt_tokens == len(ids)

    chunks = list(
        client.completions.create(model=engine.name, prompt=PROMPT, stream=True, stream_options={"include_usage": True})
    )
    *answer, last = chunks
    assert last.choices == [] and last.usage == r.usage
    assert all(c.object == "text_completion" and c.usage is None for c in answer)
    assert len([c for c in answer if c.choices[0].text]) > 3
    assert "".join(c.choices[0].text for c in answer) == expected_text
    assert answer[-1].choices[0].finish_reason == "length"

    assert client.completions.create(model=engine.name, prompt=[PROMPT]).choices[0].text == expected_text
    echoed = client.completions.create(model=engine.name, prompt=PROMPT, echo=True)
    assert echoed.choices[0].text == PROMPT + expected_text and echoed.usage == r.usage
    streamed = client.completions.create(model=engine.name, prompt=PROMPT, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + expected_text


def test_completions_stop_max_tokens_and_indentation(client, engine):
    with scripted(engine, INDENTED):
        r = client.completions.create(model=engine.name, prompt=PROMPT)
        assert r.choices[0].text == INDENTED and r.choices[0].finish_reason == "stop"
        streamed = list(client.completions.create(model=engine.name, prompt=PROMPT, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == INDENTED
        cut = client.completions.create(model=engine.name, prompt=PROMPT, stop=["# done"])
        assert cut.choices[0].text == INDENTED[: INDENTED.index("# done")] and cut.choices[0].finish_reason == "stop"
    short = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


UNSUPPORTED_COMPLETION = {
    "best_of": 2,
    "n": 2,
    "logprobs": 1,
    "suffix": "\n    return c",
    "presence_penalty": 1.0,
    "frequency_penalty": 1.0,
    "logit_bias": {"1": 5},
}


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_COMPLETION))
def test_each_unsupported_completion_field_is_a_400_naming_it(client, engine, field):
    e = bad_request(
        lambda: client.completions.create(model=engine.name, prompt=PROMPT, **{field: UNSUPPORTED_COMPLETION[field]})
    )
    assert e.param == field and e.code == "unsupported_parameter"
    assert e.body["message"].startswith(f"{field}: not supported by qtune (")


@pytest.mark.parametrize(
    "prompt, message",
    [
        (["a", "b"], "prompt: qtune completes one prompt per request, got 2; send one string"),
        ([1, 2, 3], "prompt: token-id prompts are not supported; send the prompt as text"),
        ([[1, 2]], "prompt: token-id prompts are not supported; send the prompt as text"),
        ([], "prompt: qtune completes one prompt per request, got 0; send one string"),
        (None, "prompt: expected a string, got null"),
    ],
)
def test_completion_prompts_other_than_one_text_are_a_400(client, engine, prompt, message):
    e = bad_request(lambda: client.completions.create(model=engine.name, prompt=prompt))
    assert e.param == "prompt" and e.body["message"] == message


def test_completion_prompt_too_long_for_the_context(client, engine):
    e = bad_request(lambda: client.completions.create(model=engine.name, prompt="word " * 600))
    n = len(engine.encode("word " * 600))
    assert e.code == "context_length_exceeded" and e.param == "prompt"
    assert e.body["message"] == (
        f"prompt: {n} tokens, but at most 500 fit (context 512 tokens less max_tokens 12); "
        "shorten it or lower max_tokens"
    )
    e = bad_request(lambda: client.completions.create(model=engine.name, prompt="x" * 500_000))
    assert e.code == "context_length_exceeded"
    assert e.body["message"].startswith(f"prompt: at least {500_000 // engine.max_token_chars} tokens, but at most")
    e = bad_request(lambda: client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=512))
    assert e.param == "max_tokens"
    e = bad_request(lambda: client.completions.create(model=engine.name, prompt=PROMPT, extra_body={"messages": HI}))
    assert e.param == "messages" and e.code == "unknown_parameter"


def test_an_empty_completion_prompt_is_a_400(client, engine):
    assert engine.encode("") == []  # SmolLM2's tokenizer adds no BOS: there is nothing to continue from
    e = bad_request(lambda: client.completions.create(model=engine.name, prompt=""))
    assert e.param == "prompt" and e.body["message"] == "prompt: empty: send some text to continue"


def test_a_completion_client_that_goes_away_frees_the_engine(client, engine):
    import time

    with scripted(engine, FILLER, delay=0.03):  # 120 tokens: 3.6 s or more
        stream = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=120, stream=True)
        first = [next(stream).choices[0].text for _ in range(3)]
        stream.close()
        start = time.perf_counter()
        short = client.completions.create(model=engine.name, prompt=PROMPT, max_tokens=5)
        took = time.perf_counter() - start
    assert first == [" word"] * 3 and short.choices[0].text == " word" * 5
    assert took < 2.5, took  # 5 tokens; the abandoned answer would hold the engine 117 x 30 ms = 3.5 s more
