"""The Wyoming speech services the voice door uses for satellites' audio: speech-to-text (e.g.
wyoming-faster-whisper) and text-to-speech (e.g. wyoming-piper), spoken to with the wyoming library's
client. Their failures become :class:`SpeechServiceError` with a Wyoming error code."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.tts import Synthesize, SynthesizeVoice

from agent.errors import AgentError, ProtocolError
from agent.wyoming_wire import AudioFormat, WyomingErrorCode, audio_format_of


class SpeechServiceError(AgentError):
    """A configured speech-to-text or text-to-speech service failed; the turn reports it."""

    def __init__(self, code: WyomingErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _service_client(uri: str, timeout_s: float) -> AsyncClient:
    return AsyncClient.from_uri(uri, connect_timeout=timeout_s, read_timeout=timeout_s)


class SttUpload:
    """One utterance on its way to the speech-to-text service (opened at ``audio-start``)."""

    def __init__(self, uri: str, *, timeout_s: float, fmt: AudioFormat, max_bytes: int) -> None:
        self._uri = uri
        self._timeout_s = timeout_s
        self.format = fmt
        self._max_bytes = max_bytes
        self.received = 0
        self._client: AsyncClient | None = None

    def _fail(self, what: str, exc: BaseException | str) -> SpeechServiceError:
        reason = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
        return SpeechServiceError(
            WyomingErrorCode.STT_UNAVAILABLE, f"speech-to-text service {self._uri}: {what}: {reason}"
        )

    async def open(self, *, language: str | None) -> None:
        client = _service_client(self._uri, self._timeout_s)
        try:
            await client.connect()
            self._client = client
            await client.write_event(Transcribe(language=language).event())
            f = self.format
            await client.write_event(AudioStart(rate=f.rate, width=f.width, channels=f.channels).event())
        except (OSError, asyncio.TimeoutError) as exc:
            await self.close()
            raise self._fail("cannot connect", exc) from None

    async def send(self, audio: bytes, fmt: AudioFormat) -> None:
        self.received += len(audio)
        if self.received > self._max_bytes:
            raise ProtocolError(
                WyomingErrorCode.AUDIO_TOO_LONG.value,
                f"the utterance is longer than this agent accepts ({self._max_bytes} bytes of audio)",
            )
        assert self._client is not None
        chunk = AudioChunk(rate=fmt.rate, width=fmt.width, channels=fmt.channels, audio=audio)
        try:
            await self._client.write_event(chunk.event())
        except OSError as exc:
            raise self._fail("sending audio failed", exc) from None

    async def finish(self) -> str:
        """Send ``audio-stop`` and wait for the transcript."""
        assert self._client is not None
        try:
            await self._client.write_event(AudioStop().event())
            while True:
                event = await self._client.read_event()
                if event is None:
                    raise self._fail("no transcript", "the service closed the connection")
                if Transcript.is_type(event.type):
                    text = event.data.get("text")
                    if not isinstance(text, str):
                        raise self._fail("bad transcript", "'text' is not a string")
                    return text.strip()
                if Error.is_type(event.type):
                    raise self._fail("error", str(event.data.get("text", "")))
                # transcript-start/-chunk/-stop and anything else: the final transcript follows
        except (OSError, asyncio.TimeoutError) as exc:
            raise self._fail("no transcript", exc) from None
        finally:
            await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(OSError):
                await client.disconnect()


async def synthesize(
    uri: str, text: str, *, voice: str | None, timeout_s: float, emit: Callable[[Event], Awaitable[None]]
) -> int:
    """Have the text-to-speech service speak ``text``; each audio event goes to ``emit`` as it comes.

    Returns the number of audio bytes relayed.
    """
    client = _service_client(uri, timeout_s)
    relayed = 0
    started = False

    def fail(what: str, exc: BaseException | str) -> SpeechServiceError:
        reason = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
        return SpeechServiceError(
            WyomingErrorCode.TTS_UNAVAILABLE, f"text-to-speech service {uri}: {what}: {reason}"
        )

    try:
        await client.connect()
        request = Synthesize(text=text, voice=SynthesizeVoice(name=voice) if voice else None)
        await client.write_event(request.event())
        while True:
            event = await client.read_event()
            if event is None:
                raise fail("no audio", "the service closed the connection")
            if Error.is_type(event.type):
                raise fail("error", str(event.data.get("text", "")))
            if AudioStart.is_type(event.type):
                audio_format_of(event.data)
                started = True
                await emit(event)
            elif AudioChunk.is_type(event.type) and started:
                relayed += len(event.payload or b"")
                await emit(event)
            elif AudioStop.is_type(event.type) and started:
                await emit(event)
                return relayed
    except ProtocolError as exc:
        raise fail("bad audio", exc.message) from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise fail("failed", exc) from None
    finally:
        with contextlib.suppress(OSError):
            await client.disconnect()
