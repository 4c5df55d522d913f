"""Optional language-model back end for plan feedback, behind the same interface as the parser.

:class:`DeterministicFeedbackParser` (the default) wraps :func:`~twinrt.planning.conversation.parse_feedback`.
:class:`HTTPLanguageModelParser` sends the feedback to a user-configured, OpenAI-compatible
chat-completions endpoint and reads back one JSON interpretation. It is **off by default**: it
works only when an endpoint URL and a model name are given, either as arguments or through the
environment variables ``TWINRT_LLM_ENDPOINT`` and ``TWINRT_LLM_MODEL``; an optional bearer token
comes from ``TWINRT_LLM_API_KEY``. The environment is read at call time and nothing is written to
disk or kept on the object, so no credential is ever stored (SlicerNNInteractive: "API keys are
intentionally not persisted"). Only :mod:`urllib` is used: no extra dependency.

Whatever the model answers goes through
:func:`~twinrt.planning.conversation.interpretation_from_dict`: a structure that is not in the
case, or a malformed answer, becomes a :class:`~twinrt.planning.conversation.Clarification`, and
every edit is still shown to the user for confirmation before re-planning.
"""

from __future__ import annotations

import abc
import json
import os
import re
import urllib.request
from typing import Any, Callable, Iterable, Optional

from twinrt.errors import TwinRTError
from twinrt.planning.conversation import Interpretation, interpretation_from_dict, parse_feedback

ENV_ENDPOINT = "TWINRT_LLM_ENDPOINT"
ENV_MODEL = "TWINRT_LLM_MODEL"
ENV_API_KEY = "TWINRT_LLM_API_KEY"

#: ``transport(url, body, headers, timeout_s) -> response body``; replaceable in tests (no network).
Transport = Callable[[str, bytes, dict[str, str], float], bytes]

_SYSTEM_PROMPT = (
    "You turn a radiotherapy planner's feedback into ONE JSON object and nothing else. Kinds and fields: "
    '{"kind":"GoalEdit","structure","metric" (Dmean|Dmax|Dmin|D<x>%|D<x>cc|V<x>Gy|V<x>Gy_cc),'
    '"comparator" ("<="|">="),"value","unit" (Gy|%|cc),"priority" (must|should|nice),"action" (set)}; '
    '{"kind":"TradeOff","favour","favour_aspect" (spare|cover),"accept","accept_aspect" (coverage|dose)}; '
    '{"kind":"CoverageRequest","structure","direction" (increase|decrease)}; '
    '{"kind":"DeliveryRequest","aspect" (mu|modulation|segments),"direction","limit"}; '
    '{"kind":"Question","structure","topic" (dose|mu|failed|goals)}; '
    '{"kind":"Clarification","question","reason","options"}. '
    "Use only structure names from the list given. If anything is ambiguous (two possible structures, "
    "a number without unit, a missing metric), answer with a Clarification: never guess."
)


class LanguageModelNotConfiguredError(TwinRTError, RuntimeError):
    """The language-model parser was used without an endpoint and a model."""


class FeedbackParser(abc.ABC):
    """Interface: text and the case's structure names in, one interpretation out."""

    @abc.abstractmethod
    def parse(self, text: str, structures: Iterable[Any], evaluation: Any = None) -> Interpretation:
        """Interpret ``text`` (see :func:`~twinrt.planning.conversation.parse_feedback`).

        :param text: the feedback as typed.
        :param structures: the case's structure names (or objects with ``name``).
        :param evaluation: optional plan evaluation.
        """


class DeterministicFeedbackParser(FeedbackParser):
    """The default: the rule-based parser of :mod:`twinrt.planning.conversation`."""

    def parse(self, text: str, structures: Iterable[Any], evaluation: Any = None) -> Interpretation:
        return parse_feedback(text, structures, evaluation)


def _urllib_transport(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> bytes:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (user-configured URL)
        return response.read()


class HTTPLanguageModelParser(FeedbackParser):
    """An OpenAI-compatible chat-completions endpoint, used only when explicitly configured.

    :param endpoint: full URL of the chat-completions endpoint; ``None``: ``TWINRT_LLM_ENDPOINT``
        read at each call.
    :param model: model name; ``None``: ``TWINRT_LLM_MODEL`` read at each call.
    :param timeout_s: request timeout.
    :param transport: function doing the POST (default: :mod:`urllib`); tests pass a fake.
    """

    def __init__(self, endpoint: Optional[str] = None, model: Optional[str] = None, timeout_s: float = 30.0,
                 transport: Optional[Transport] = None):
        self._endpoint = endpoint
        self._model = model
        self.timeout_s = float(timeout_s)
        self._transport = transport or _urllib_transport

    def _settings(self) -> tuple[str, str]:
        # Read the environment now, not in __init__: a changed or cleared variable takes effect at once.
        endpoint = self._endpoint or os.environ.get(ENV_ENDPOINT, "").strip()
        model = self._model or os.environ.get(ENV_MODEL, "").strip()
        return endpoint, model

    def is_configured(self) -> bool:
        """True when an endpoint URL and a model name are set (argument or environment)."""
        endpoint, model = self._settings()
        return bool(endpoint) and bool(model)

    def parse(self, text: str, structures: Iterable[Any], evaluation: Any = None) -> Interpretation:
        """Ask the endpoint, then validate its answer against the case (see module docstring).

        :raises LanguageModelNotConfiguredError: no endpoint or no model configured.
        """
        endpoint, model = self._settings()
        if not endpoint or not model:
            raise LanguageModelNotConfiguredError(
                f"The language-model feedback parser is off: set {ENV_ENDPOINT} and {ENV_MODEL} (or pass endpoint "
                "and model) to use it, or use the built-in parser")
        # urllib would also open file:// and ftp:// URLs; only a web endpoint is meant here.
        if not endpoint.lower().startswith(("http://", "https://")):
            raise LanguageModelNotConfiguredError(f"{ENV_ENDPOINT} must be an http(s) URL, got '{endpoint}'")
        names = [s if isinstance(s, str) else str(getattr(s, "name")) for s in structures]
        # temperature 0: the same feedback should give the same answer, as with the built-in parser.
        payload = {"model": model, "temperature": 0,
                   "messages": [{"role": "system", "content": _SYSTEM_PROMPT},
                                {"role": "user", "content": json.dumps({"structures": names, "feedback": text})}]}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(ENV_API_KEY, "").strip()
        if key:
            headers["Authorization"] = f"Bearer {key}"  # used for this request only, never kept
        # The reply is untrusted text: it is parsed and validated against the case, never executed.
        raw = self._transport(endpoint, json.dumps(payload).encode("utf-8"), headers, self.timeout_s)
        return interpretation_from_dict(_answer_json(raw), names, text)


def _answer_json(raw: bytes) -> dict[str, Any]:
    """The interpretation dict in a chat-completions response (tolerating a ```json fence)."""
    try:
        body = json.loads(raw.decode("utf-8"))
        content = body["choices"][0]["message"]["content"] if "choices" in body else body
        if isinstance(content, str):
            # Chat models often wrap JSON in a ```json fence or add a sentence: take the outermost object.
            fenced = re.search(r"\{.*\}", content, re.DOTALL)
            content = json.loads(fenced.group(0)) if fenced else {}
        return content if isinstance(content, dict) else {}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return {}  # interpretation_from_dict turns this into a "please rephrase" clarification


def default_parser() -> FeedbackParser:
    """The deterministic parser: the language-model parser is never chosen implicitly."""
    return DeterministicFeedbackParser()
