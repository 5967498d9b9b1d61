"""scripts/fast_upstream.py's `--anthropic` mode, which `make bench` puts behind an
Anthropic managed endpoint: the official SDK reads its stream and its plain answer."""

from __future__ import annotations

import anthropic

from .fast import fast_upstream

CHAT: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Say hello."}]


async def test_anthropic_mode_streams_messages_events_the_sdk_accepts() -> None:
    async with fast_upstream("--anthropic", "--chunks", "4") as port:
        client = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{port}", api_key="k")
        async with client.messages.stream(
            model="claude-bench", max_tokens=256, messages=CHAT
        ) as stream:
            kinds = [event.type async for event in stream]
            message = await stream.get_final_message()
        plain = await client.messages.create(model="claude-bench", max_tokens=256, messages=CHAT)
        await client.close()
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert message.content[0].type == "text"
    assert message.content[0].text == "tok0 tok1 tok2 tok3 "
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 4
    assert plain.content[0].type == "text"
    assert plain.content[0].text == "Hello from the fast upstream."
