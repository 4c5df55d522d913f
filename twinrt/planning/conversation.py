"""Typed plan feedback in plain words, turned into a structured edit, an answer or a question back.

The planner types what they want ("keep the left parotid mean under 20 Gy", "more coverage of
PTV63", "fewer MU", "why is the cord so high?"); :func:`parse_feedback` turns it into one
:class:`Interpretation`. Nothing is applied here: every interpretation has
:meth:`~Interpretation.confirmation_text`, which restates it in plain words so that the user
confirms it before re-planning. The parser is deterministic (regular expressions and fixed word
lists, no randomness, no network): the same text and structure list always give the same result.
When the text admits two readings, the result is a :class:`Clarification`, never a guess.

Grammar (case-insensitive; ``[x]`` optional, ``a | b`` alternatives, ``S`` a structure mention)::

    feedback    := question | trade_off | delivery | coverage | goal_edit | spare
    question    := ("why" | "what" | "how" | "which" | "is" | "are" | "does" | "did" | "explain"
                    | "tell me" | "show me") ... [S | "mu" | "goals" | "fail..."] ... ["?"]
                 | <any text ending in "?" with no request verb>
    trade_off   := [spare_verb | "prioritise" | "favour" | "prefer"] S ...
                   ("even if" | "even though" | "at the expense of" | "at the cost of" | "accepting"
                    | "and accept" | "rather than" | "instead of" | "over" | "more than") ... S ...
    delivery    := [less_word] ("mu" | "monitor units" | "modulation" | "segments" | "apertures"
                    | "control points" | "complexity" | "beam-on time" | "delivery time")
                   [comparator number ["mu"]]          e.g. "fewer MU", "keep MU under 800"
    coverage    := [more_word] "coverage" ["of" | "on" | "for"] S | S "is underdosed" | S "is too cold"
    goal_edit   := [verb] S metric comparator number unit [priority]
                 | [verb] metric ["of" | "for" | "to"] S comparator number unit [priority]
                 | number "%" ["coverage"] ["of"] S ... number unit       (→ D<x>% >= value)
    spare       := spare_verb S                        e.g. "spare the larynx"

    metric      := "dmean" | "mean [dose]" | "average"            → Dmean
                 | "dmax" | "max[imum] [dose]" | "hottest" | "peak" | "hot spot" → Dmax
                 | "dmin" | "min[imum] [dose]" | "coldest"        → Dmin
                 | "d" x ["%"] | "d" x "cc" | x "cc"              → D<x>%, D<x>cc
                 | "v" x ["gy"] [("_cc" | "cc")]                  → V<x>Gy (% of volume) / V<x>Gy_cc
    comparator  := "<=" | "<" | "≤" | "under" | "below" | "less than" | "lower than" | "at most"
                   | "no more than" | "not more than" | "not exceed" | "not above" | "up to" | "within"
                   | "limit[ed] to" | "cap[ped] at" | "max[imum] [of]" <number>    → "<="
                 | ">=" | ">" | "≥" | "over" | "above" | "at least" | "more than" | "greater than"
                   | "no less than" | "not less than" | "not below" | "min[imum] [of]" <number> → ">="
    unit        := "gy" | "cgy" (÷ 100 → Gy) | "%" | "percent" | "cc" | "ml" | "cm3"
    priority    := "must" | "has to" | "mandatory" | "hard" | "never exceed"      → must
                 | "ideally" | "if possible" | "try to" | "preferably" | "nice to have" → nice
                 | (otherwise)                                                   → should

Structure mentions ``S`` are resolved against the case's structure names. A name and a mention are
both split into words (``LeftParotid`` → "left parotid", ``Parotid_L`` → "parotid l",
``PTV63`` → "ptv 63"), side words are taken off (left, right, l, r, lt, rt), and the rest is mapped
through :data:`SYNONYMS` ("cord" → spinal cord, "brain stem" → brainstem, "oesophagus" →
esophagus, "jaw" → mandible, "voice box" → larynx). A mention matches a structure when the
organ and the side agree; a bare "PTV" matches every "PTV<n>". One unknown word that is close to
exactly one structure word (difflib ratio ≥ 0.8) is taken as that structure, and the confirmation
text names the structure so that the user sees it. Two or more candidates, a missing unit, an
unknown structure, a metric that the words do not fix, a missing comparator, or instructions that
contradict each other give a :class:`Clarification`.
"""

from __future__ import annotations

import abc
import difflib
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence

from twinrt.model import StructureType
from twinrt.planning.goals import Goal, GoalResult, parse_metric

# ---------------------------------------------------------------------------------------------
# Vocabulary

#: Organ concepts and the phrases that name them (lower case, words separated by one space).
#: Side words are never part of a phrase: laterality is read separately so that "left parotid",
#: "parotid left", "Parotid_L" and "lt parotid" all resolve the same way.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "spinal cord": ("spinal cord", "cord", "spinalcord", "spinal canal", "spine"),
    "brainstem": ("brainstem", "brain stem"),
    "esophagus": ("esophagus", "oesophagus", "gullet"),
    "mandible": ("mandible", "jaw", "jawbone", "jaw bone", "lower jaw"),
    "larynx": ("larynx", "voice box", "glottis"),
    "parotid": ("parotid", "parotids", "parotid gland", "parotid glands"),
    "submandibular": ("submandibular", "submandibular gland", "submandibular glands", "smg"),
    "oral cavity": ("oral cavity", "mouth"),
    "cochlea": ("cochlea", "cochleas", "cochleae", "inner ear"),
    "optic nerve": ("optic nerve", "optic nerves"),
    "chiasm": ("chiasm", "optic chiasm", "chiasma"),
    "eye": ("eye", "eyes", "globe"),
    "lens": ("lens", "lenses"),
    "brain": ("brain",),
    "lung": ("lung", "lungs"),
    "heart": ("heart",),
    "kidney": ("kidney", "kidneys"),
    "liver": ("liver",),
    "rectum": ("rectum",),
    "bladder": ("bladder",),
    "femoral head": ("femoral head", "femoral heads", "femur", "hip"),
    "bowel": ("bowel", "small bowel", "bowel bag"),
    "constrictors": ("constrictors", "pharyngeal constrictors", "pharynx"),
    "thyroid": ("thyroid",),
    "body": ("body", "external", "outline", "patient"),
    "ptv": ("ptv",),
    "ctv": ("ctv",),
    "gtv": ("gtv",),
}
_PHRASE_TO_CONCEPT = {p: c for c, ps in SYNONYMS.items() for p in ps}

_SIDE_WORDS = {"left": "L", "l": "L", "lt": "L", "right": "R", "r": "R", "rt": "R"}
_PLURAL_WORDS = ("both", "all", "parotids", "lungs", "kidneys", "eyes", "lenses", "cochleas", "cochleae",
                 "optic nerves", "femoral heads", "submandibular glands", "parotid glands")

#: Spoken metric words → goal metric names (:func:`twinrt.planning.goals.parse_metric` grammar).
_METRIC_WORDS = (
    (r"\bmean dose\b|\bmean\b|\baverage dose\b|\baverage\b", "Dmean"),
    (r"\bmaximum dose\b|\bmax dose\b|\bmaximum\b|\bmax\b|\bhottest\b|\bpeak dose\b|\bpeak\b|\bhot spots?\b",
     "Dmax"),
    (r"\bminimum dose\b|\bmin dose\b|\bminimum\b|\bmin\b|\bcoldest\b", "Dmin"),
)

_LE_WORDS = (r"<=|<|\bunder\b|\bbelow\b|\bless than\b|\blower than\b|\bsmaller than\b|\bat most\b|"
             r"\bno more than\b|\bnot more than\b|\bnot (?:to )?exceed\b|\bnever exceed\b|\bnot above\b|"
             r"\bnot over\b|\bup to\b|\bwithin\b|\blimit(?:ed)? (?:it )?to\b|\bcap(?:ped)? (?:it )?at\b|"
             r"\bbeneath\b")
_GE_WORDS = (r">=|>|\bover\b|\babove\b|\bat least\b|\bmore than\b|\bgreater than\b|\bhigher than\b|"
             r"\bno less than\b|\bnot less than\b|\bnot below\b|\bnot under\b")

_MUST = r"\bmust\b|\bhas to\b|\bhave to\b|\bmandatory\b|\bhard (?:limit|constraint)\b|\bnever exceed\b|\babsolutely\b"
_NICE = r"\bideally\b|\bif possible\b|\btry to\b|\bpreferably\b|\bnice to have\b|\bif you can\b"

_LESS = (r"\bfewer\b|\bless\b|\blower\b|\breduce\b|\bdecrease\b|\bcut\b|\bsmaller\b|\bsimpler\b|\bminimi[sz]e\b|"
         r"\btoo (?:many|much|high|hot|complex)\b|\bshorter\b|\bfaster\b|\bsmoother\b|\bdrop\b|\bbring down\b")
_MORE = r"\bmore\b|\bincrease\b|\braise\b|\bhigher\b|\bimprove\b|\bbetter\b|\bboost\b|\bbump up\b|\bmaximi[sz]e\b"

_SPARE = r"\bspare\b|\bsparing\b|\bprotect\b|\bsave\b|\bavoid\b|\bless dose (?:to|on|in)\b|\blower dose (?:to|on)\b"
_TRADE_CONNECTORS = (r"\beven if\b|\beven though\b|\bat the expense of\b|\bat the cost of\b|\baccepting\b|"
                     r"\band accept\b|\bit is ok if\b|\bit s ok if\b|\bthough\b|\brather than\b|\binstead of\b|"
                     r"\bmore than\b|\bover\b|\bbefore\b|\beven at\b")
_PRIORITISE = r"\bprioriti[sz]e\b|\bfavou?r\b|\bprefer\b|\bput\b.*\bfirst\b|\bmore important\b"
_QUESTION_START = (r"^(?:why|what|whats|how|which|where|is|are|does|do|did|was|were|explain|tell me|"
                   r"show me|can you explain|could you explain)\b")
_POLITE_PREFIX = (r"^(?:(?:please|pls|ok|okay|now|then|also|and|so)\s+)*(?:(?:can|could|would|will) you\s+"
                  r"(?:please\s+)?|i (?:want|would like|d like) (?:you )?to\s+|let s\s+|lets\s+)?")

_DELIVERY_ASPECTS = (
    (r"\bmonitor units?\b|\bmus?\b|\bbeam on time\b|\bdelivery time\b|\bdeliver faster\b|\bfaster delivery\b|"
     r"\bfaster to deliver\b|\bquicker\b", "mu"),
    (r"\bmodulation\b|\bmodulated\b|\bcomplexity\b|\bcomplex\b|\bfluence\b|\bsmoother\b", "modulation"),
    (r"\bsegments?\b|\bapertures?\b|\bcontrol points?\b", "segments"),
)


# ---------------------------------------------------------------------------------------------
# Result types

@dataclass(frozen=True)
class Interpretation(abc.ABC):
    """Base class: what a piece of feedback means. ``text`` is the feedback as typed."""

    text: str = field(default="", compare=False)

    @property
    def kind(self) -> str:
        """Type name used in dicts and the test set (``"GoalEdit"``, ``"Clarification"`` ...)."""
        return type(self).__name__

    @property
    def needs_confirmation(self) -> bool:
        """True for edits, which the user confirms before re-planning (not for questions)."""
        return True

    @abc.abstractmethod
    def confirmation_text(self) -> str:
        """The interpretation restated in plain words, for the user to confirm."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"kind": ..., <fields>}`` without the original text."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k != "text"}
        return {"kind": self.kind, **d}


@dataclass(frozen=True)
class GoalEdit(Interpretation):
    """Add, tighten or relax a clinical goal, e.g. ``LeftParotid Dmean <= 20 Gy``.

    :param structure: structure name as in the case.
    :param metric: goal metric (``Dmean``, ``Dmax``, ``D95%``, ``D0.1cc``, ``V20Gy``, ``V20Gy_cc``).
    :param comparator: ``"<="`` or ``">="``; ``None`` only with ``value`` ``None``.
    :param value: the limit in ``unit``; ``None`` for "lower/raise it" without a number.
    :param unit: ``Gy``, ``%`` or ``cc`` (the metric's unit).
    :param priority: ``must``, ``should`` or ``nice``.
    :param action: ``set`` (a limit given), ``tighten`` or ``relax`` (direction only, or compared
        with the existing goal of the evaluation), ``add`` (no such goal in the evaluation).
    """

    structure: str = ""
    metric: str = ""
    comparator: Optional[str] = None
    value: Optional[float] = None
    unit: str = "Gy"
    priority: str = "should"
    action: str = "set"

    def to_goal(self) -> Goal:
        """The edit as a :class:`~twinrt.planning.goals.Goal` (needs a value and a comparator)."""
        if self.value is None or self.comparator is None:
            raise ValueError(f"'{self.confirmation_text()}' has no limit value; it cannot be written as a goal")
        return Goal(self.structure, self.metric, self.comparator, self.value, self.priority,
                    source="user feedback", note=self.text)

    def confirmation_text(self) -> str:
        if self.value is None:
            word = "Lower" if self.action == "tighten" else "Allow a higher"
            if self.comparator == ">=":
                word = "Raise" if self.action == "tighten" else "Allow a lower"
            return f"{word} {self.structure} {self.metric} than in the current plan ({self.priority} priority)."
        verb = {"add": "Add the goal", "tighten": "Tighten the goal to", "relax": "Relax the goal to"}.get(
            self.action, "Set the goal")
        words = "at most" if self.comparator == "<=" else "at least"
        return (f"{verb} {self.structure} {self.metric} {self.comparator} {self.value:g} {self.unit} "
                f"({words} {self.value:g} {self.unit}, {self.priority} priority).")


@dataclass(frozen=True)
class TradeOff(Interpretation):
    """Favour one structure and accept less on another ("spare the larynx even if PTV56 drops a bit").

    :param favour: structure to favour.
    :param favour_aspect: ``spare`` (lower its dose) or ``cover`` (raise its coverage).
    :param accept: structure allowed to get worse, or ``None`` when none was named ("spare the larynx").
    :param accept_aspect: ``coverage`` (may lose coverage) or ``dose`` (may get more dose).
    """

    favour: str = ""
    favour_aspect: str = "spare"
    accept: Optional[str] = None
    accept_aspect: Optional[str] = None

    def confirmation_text(self) -> str:
        head = (f"Lower the dose to {self.favour} (raise the weight of its objectives)" if self.favour_aspect == "spare"
                else f"Improve the coverage of {self.favour} (raise the weight of its objectives)")
        if self.accept is None:
            return head + "; no other structure was named as allowed to get worse."
        tail = (f"{self.accept} may lose some coverage" if self.accept_aspect == "coverage"
                else f"{self.accept} may receive more dose")
        return f"{head}, accepting that {tail} (its objectives' weight is lowered)."


@dataclass(frozen=True)
class CoverageRequest(Interpretation):
    """Raise (or lower) the coverage priority of a target ("more coverage of PTV63").

    :param structure: target structure name.
    :param direction: ``increase`` or ``decrease``.
    """

    structure: str = ""
    direction: str = "increase"

    def confirmation_text(self) -> str:
        if self.direction == "increase":
            return (f"Raise the priority of {self.structure} coverage (the weight of its lower-dose objectives), "
                    f"which may cost some sparing elsewhere.")
        return f"Lower the priority of {self.structure} coverage (the weight of its lower-dose objectives)."


@dataclass(frozen=True)
class DeliveryRequest(Interpretation):
    """Make the plan easier to deliver ("fewer MU", "less modulation", "fewer segments").

    :param aspect: ``mu``, ``modulation`` or ``segments``.
    :param direction: ``decrease`` or ``increase``.
    :param limit: an upper limit (MU or number of segments) when one was given, else ``None``.
    """

    aspect: str = "mu"
    direction: str = "decrease"
    limit: Optional[float] = None

    def confirmation_text(self) -> str:
        name = {"mu": "monitor units (MU)", "modulation": "fluence modulation", "segments": "number of segments"}[
            self.aspect]
        if self.limit is not None:
            return f"Keep the {name} at most {self.limit:g}; dose goals may get slightly worse."
        if self.direction == "decrease":
            return f"Reduce the {name} (smoother fluence); dose goals may get slightly worse."
        return f"Allow more {name} to improve the dose goals."


@dataclass(frozen=True)
class Question(Interpretation):
    """A request for an explanation ("why is the cord so high?"); :func:`answer` answers it.

    :param structure: the structure asked about, or ``None``.
    :param topic: ``dose`` (a structure's goals), ``mu`` (deliverability), ``failed`` (goals not
        met) or ``goals`` (all goals).
    """

    structure: Optional[str] = None
    topic: str = "dose"

    @property
    def needs_confirmation(self) -> bool:
        return False

    def confirmation_text(self) -> str:
        about = self.structure if self.structure else {"mu": "the monitor units", "failed": "the goals not met",
                                                       "goals": "the goals", "dose": "the dose"}[self.topic]
        return f"Question about {about}; answered from the plan evaluation, nothing is changed."


@dataclass(frozen=True)
class Clarification(Interpretation):
    """A question back to the user, when the feedback has more than one reading or misses something.

    :param question: what to ask, in plain words.
    :param reason: ``ambiguous_structure``, ``unknown_structure``, ``missing_unit``, ``missing_metric``,
        ``missing_comparator``, ``unit_mismatch``, ``implausible_value``, ``conflict``,
        ``several_requests``, ``unsupported_metric`` or ``not_understood``.
    :param options: the candidate answers (structure names, units, metrics), possibly empty.
    """

    question: str = ""
    reason: str = "not_understood"
    options: tuple[str, ...] = ()

    @property
    def needs_confirmation(self) -> bool:
        return False

    def confirmation_text(self) -> str:
        return self.question


# ---------------------------------------------------------------------------------------------
# Text normalisation and structure resolution

def _split_words(text: str) -> list[str]:
    """Words of a name or a sentence: camelCase, letter-digit and punctuation boundaries split, lower case."""
    s = text.replace("≤", " <= ").replace("≥", " >= ").replace("’", "'")
    s = re.sub(r"(?i)\bc\s?gy\b|(?<=\d)c\s?gy\b", " cgy", s)  # before the camelCase split, which would cut "cGy"
    s = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", s)           # LeftParotid -> Left Parotid
    s = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", " ", s)      # PTVBoost -> PTV Boost
    s = s.lower()
    s = re.sub(r"(?<=[a-z])(?=\d)", " ", s)              # ptv63 -> ptv 63 (metrics are masked before)
    s = s.replace("'", " ")
    return re.findall(r"<=|>=|[<>]|\d+(?:\.\d+)?|[a-z]+|%|\?|§\w+", s)


@dataclass(frozen=True)
class _StructInfo:
    name: str
    concept: str
    side: Optional[str]


def _structure_info(name: str) -> _StructInfo:
    words = _split_words(name)
    side = None
    rest = []
    for w in words:
        if w in _SIDE_WORDS and side is None and len(words) > 1:
            side = _SIDE_WORDS[w]
        else:
            rest.append(w)
    phrase = " ".join(rest)
    return _StructInfo(name, _PHRASE_TO_CONCEPT.get(phrase, phrase), side)


@dataclass
class _Mention:
    concept: str
    side: Optional[str]
    plural: bool
    start: int
    end: int
    words: str
    fuzzy: bool = False


def _find_mentions(tokens: list[str], infos: list[_StructInfo]) -> list[_Mention]:
    """Longest-phrase scan for organ phrases (synonyms and the case's own names) in ``tokens``."""
    phrases: dict[tuple[str, ...], str] = {tuple(p.split()): c for p, c in _PHRASE_TO_CONCEPT.items()}
    for info in infos:
        if info.concept:
            phrases.setdefault(tuple(info.concept.split()), info.concept)
    # A bare target prefix ("ptv") counts as a mention so that "the PTV" with several PTVs is asked about.
    for info in infos:
        head = info.concept.split()[0] if info.concept else ""
        if head in ("ptv", "ctv", "gtv", "itv"):
            phrases.setdefault((head,), head)
    # Longest match first, so that "brain stem" is one mention and not "brain" followed by a stray word,
    # and "spinal cord" is not read as "cord" alone.
    longest = max((len(p) for p in phrases), default=1)
    mentions: list[_Mention] = []
    i = 0
    while i < len(tokens):
        hit = None
        for n in range(min(longest, len(tokens) - i), 0, -1):
            key = tuple(tokens[i:i + n])
            if key in phrases:
                hit = (n, phrases[key])
                break
        if hit is None:
            i += 1
            continue
        n, concept = hit
        start, end = i, i + n
        # "ptv 63" written with a space: take the number when it is not a dose or a percentage.
        if concept in ("ptv", "ctv", "gtv", "itv") and end < len(tokens) and re.fullmatch(r"\d+(\.\d+)?", tokens[end]):
            unit_next = tokens[end + 1] if end + 1 < len(tokens) else ""
            if unit_next not in ("gy", "cgy", "%", "percent", "cc", "ml"):
                concept = f"{concept} {tokens[end]}"
                end += 1
        # The side is the word just before ("left parotid", "lt parotid") or just after ("parotid l").
        side = None
        if start > 0 and tokens[start - 1] in _SIDE_WORDS:
            side = _SIDE_WORDS[tokens[start - 1]]
            start -= 1
        elif end < len(tokens) and tokens[end] in _SIDE_WORDS:
            side = _SIDE_WORDS[tokens[end]]
            end += 1
        words = " ".join(tokens[start:end])
        plural = (start > 0 and tokens[start - 1] in ("both", "all")) or words in _PLURAL_WORDS \
            or " ".join(tokens[i:i + n]) in _PLURAL_WORDS
        mentions.append(_Mention(concept, side, plural, start, end, words))
        i = end
    return mentions


#: Words of the grammar; any other word may be a misspelt structure name (see :func:`_fuzzy_mentions`).
_GRAMMAR_WORDS = set("""
keep the a an of to for on in at is are be it its this that and or but with by from as if so too very
mean dose average max maximum min minimum hottest coldest peak hot spot spots under below less than lower
smaller most no not more exceed never above over up within limit limited cap capped beneath greater higher
least must has have mandatory hard constraint absolutely ideally possible try preferably nice can you could
would please fewer reduce decrease cut simpler minimise minimize many much high complex shorter faster
smoother drop bring down increase raise improve better boost bump maximise maximize spare sparing protect
save avoid even though expense cost accepting accept ok okay rather instead before prioritise prioritize
favour favor prefer put first important why what whats how which where does do did was were explain tell me
show coverage cover covered underdosed underdose cold hot mu mus monitor unit units beam time delivery
deliver quicker modulation modulated complexity fluence segment segments aperture apertures control point
points gy cgy percent cc ml cm volume get gets getting receive receives received should goal goals
limit limits let lets i want like d now then also bit little slightly drops drop go goes allowed allow fine
margin tighten relax loosen plan plans lot way much make sure stay stays remain under were fail failed
failing pass passed met meet so high low than too both all left right l r lt rt side sided my our we
will target targets organ organs just only around about per cent percentage value number give gave given
""".split())


def _fuzzy_mentions(tokens: list[str], taken: set[int], infos: list[_StructInfo]) -> tuple[list[_Mention], list[str]]:
    """Mentions from single misspelt words close to a structure word, and the words matching nothing."""
    vocab: dict[str, set[str]] = {}
    for p, c in _PHRASE_TO_CONCEPT.items():
        if " " not in p:
            vocab.setdefault(p, set()).add(c)
    for info in infos:
        for w in info.concept.split():
            if w.isalpha() and len(w) >= 4:
                vocab.setdefault(w, set()).add(info.concept)
    out, unknown = [], []
    # Only single words of 4+ letters outside the grammar are tried: short words ("cc", "of") would
    # match organ names by chance, and difflib's ratio is unreliable below 4 letters.
    for i, tok in enumerate(tokens):
        if i in taken or not tok.isalpha() or len(tok) < 4 or tok in _GRAMMAR_WORDS or tok.startswith("§"):
            continue
        close = difflib.get_close_matches(tok, sorted(vocab), n=5, cutoff=0.8)
        concepts = sorted({c for w in close for c in vocab[w]})
        # Several concepts ("brainsteem" → brainstem and brainstem prv) stay joined with "|" so that
        # _candidates offers all of them and the user is asked.
        if len(concepts) == 1:
            side = _SIDE_WORDS.get(tokens[i - 1]) if i > 0 else None
            out.append(_Mention(concepts[0], side, False, i, i + 1, tok, fuzzy=True))
        elif concepts:
            out.append(_Mention("|".join(concepts), None, False, i, i + 1, tok, fuzzy=True))
        else:
            unknown.append(tok)
    return out, unknown


def _candidates(m: _Mention, infos: list[_StructInfo]) -> list[str]:
    literal = [s.name for s in infos if " ".join(_split_words(s.name)) == m.words]
    if len(literal) == 1:
        return literal  # the mention spells a structure's own name ("lungs" and a structure "Lungs")
    concepts = m.concept.split("|")
    exact = [s for s in infos if s.concept in concepts and (m.side is None or s.side == m.side)]
    if not exact:
        # "ptv" matches "ptv 56", "ptv 63" ...; "cord" matches "spinal cord prv" only as a prefix.
        exact = [s for s in infos if any(s.concept.startswith(c + " ") for c in concepts)
                 and (m.side is None or s.side == m.side)]
    return sorted(s.name for s in exact)  # sorted: the question reads the same whatever the case's order


def _close_names(word: str, names: Sequence[str]) -> list[str]:
    # A lower cutoff than for fuzzy mentions: these names are only offered as options, never chosen.
    lowered = {n.lower(): n for n in names}
    hits = difflib.get_close_matches(word.replace(" ", ""), list(lowered), n=3, cutoff=0.5)
    return [lowered[h] for h in hits]


# ---------------------------------------------------------------------------------------------
# Parsing

_METRIC_TOKEN = re.compile(
    r"(?<![\w.])(?:d\s?mean|d\s?max|d\s?min|d(?P<dx>\d+(?:\.\d+)?)\s?(?P<du>%|cc)?|"
    r"v(?P<vx>\d+(?:\.\d+)?)\s?(?:gy)?(?P<vcc>_cc|\s?cc)?)(?![\w.])", re.IGNORECASE)


def _mask_metrics(text: str) -> tuple[str, list[str]]:
    """Replace explicit metric tokens (Dmean, D95, D95%, D0.1cc, V20, V20Gy, V20Gy_cc) by §m<i> markers."""
    metrics: list[str] = []

    def repl(m: re.Match) -> str:
        raw = m.group(0).lower().replace(" ", "")
        if raw in ("dmean", "dmax", "dmin"):
            name = {"dmean": "Dmean", "dmax": "Dmax", "dmin": "Dmin"}[raw]
        elif m.group("dx") is not None:
            # "D95" is read as D95% (the usual shorthand); only "cc" makes it an absolute volume.
            name = f"D{m.group('dx')}{'cc' if m.group('du') == 'cc' else '%'}"
        else:
            name = f"V{m.group('vx')}Gy{'_cc' if m.group('vcc') else ''}"
        metrics.append(name)
        return f" §m{chr(97 + len(metrics) - 1)} "

    return _METRIC_TOKEN.sub(repl, text), metrics


_NUMBER = re.compile(r"(?<![§\w])(\d+(?:\.\d+)?) ?(cgy|gy|%|percent|per cent|cc|ml|cm 3|mu)?(?![\w])")


def _values(s: str) -> list[tuple[float, Optional[str], int]]:
    """Numbers with their unit (``Gy`` after cGy conversion, ``%``, ``cc``, ``MU`` or ``None``)."""
    out = []
    for m in _NUMBER.finditer(s):
        v = float(m.group(1))
        u = m.group(2)
        unit = None
        if u == "cgy":
            v, unit = v / 100.0, "Gy"  # cGy → Gy so that goals are always stored in Gy
        elif u == "gy":
            unit = "Gy"
        elif u in ("%", "percent", "per cent"):
            unit = "%"
        elif u in ("cc", "ml", "cm 3"):
            unit = "cc"
        elif u == "mu":
            unit = "MU"
        out.append((v, unit, m.start()))
    return out


def _has(pattern: str, s: str) -> bool:
    return re.search(pattern, s) is not None


def _priority(s: str) -> str:
    if _has(_MUST, s):
        return "must"
    if _has(_NICE, s):
        return "nice"
    return "should"


def _structure_names(structures: Iterable[Any]) -> list[str]:
    return [s if isinstance(s, str) else str(getattr(s, "name")) for s in structures]


def _is_target(name: str) -> bool:
    return StructureType.guess(name) == StructureType.TARGET


def parse_feedback(text: str, structures: Iterable[Any], evaluation: Any = None) -> Interpretation:
    """Turn one piece of typed feedback into an edit, a question or a clarification (see module docstring).

    :param text: the feedback as typed.
    :param structures: the case's structure names (or objects with a ``name``, e.g. ``Case.structures``).
    :param evaluation: optional :class:`~twinrt.planning.evaluation.PlanEvaluation` (anything with
        ``results``: a list of :class:`~twinrt.planning.goals.GoalResult`). It fixes the metric of
        "relax the cord limit to 48 Gy" when the structure has exactly one goal, and labels an edit
        as add / tighten / relax relative to the existing goal.
    :return: a :class:`GoalEdit`, :class:`TradeOff`, :class:`CoverageRequest`,
        :class:`DeliveryRequest`, :class:`Question` or :class:`Clarification`.
    """
    names = _structure_names(structures)
    infos = [_structure_info(n) for n in names]
    raw = " ".join(str(text or "").split())
    if not raw:
        return Clarification(raw, "Please type what you would like to change or ask about the plan.", "not_understood")

    if re.search(r"(?i)(?<![\w.])v\d+(?:\.\d+)?\s?%", raw):
        # V95% (volume at a percentage of the prescription) needs the prescription: ask for the dose in Gy.
        return Clarification(raw, "Volume at a percentage of the prescription (V95%) is not supported here: give "
                                  "the dose in Gy, e.g. 'PTV70 V66.5Gy at least 98%'.", "unsupported_metric")
    masked, metrics = _mask_metrics(raw.replace("≤", " <= ").replace("≥", " >= "))
    tokens = _split_words(masked)
    mentions = _find_mentions(tokens, infos)
    taken = {i for m in mentions for i in range(m.start, m.end)}
    fuzzy, unknown = _fuzzy_mentions(tokens, taken, infos)
    mentions = sorted(mentions + fuzzy, key=lambda m: m.start)

    # Resolve every mention; the first ambiguity or unknown one is asked about. Asking about one thing
    # at a time keeps the question short; the user's next message is parsed afresh.
    resolved: list[tuple[_Mention, str]] = []
    for m in mentions:
        cands = _candidates(m, infos)
        if len(cands) == 1:
            resolved.append((m, cands[0]))
            continue
        if len(cands) > 1:
            label = m.words if not m.fuzzy else f"'{m.words}'"
            return Clarification(raw, f"Which {label}: {' or '.join(cands)}?", "ambiguous_structure", tuple(cands))
        close = _close_names(m.concept, names)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        return Clarification(raw, f"There is no structure '{m.words}' in this case.{hint} "
                                  f"Which structure do you mean?", "unknown_structure", tuple(close))

    # The sentence with structures replaced by §s<i> and metrics already §m<i>, for keyword matching.
    out_tokens = list(tokens)
    for k, (m, _) in enumerate(resolved):
        out_tokens[m.start] = f"§s{chr(97 + k)}"
        for j in range(m.start + 1, m.end):
            out_tokens[j] = ""
    s = " ".join(t for t in out_tokens if t)
    structs = list(dict.fromkeys(name for _, name in resolved))

    # "can you spare the oral cavity?" is a request in question form: take the polite prefix off first.
    body = re.sub(_POLITE_PREFIX, "", s)
    requested = _has(_SPARE + "|" + _LESS + "|" + _MORE + r"|\bkeep\b", s)
    is_question = _has(_QUESTION_START, body) and not (
        _has(r"^(?:explain|tell me|show me)\b", body) and requested and not _has(r"\bwhy\b|\bhow\b", body))
    if not is_question and s.endswith("?") and body == s and not requested:
        is_question = True
    if is_question:
        return _question(raw, s, structs)

    # Trade-off: two structures around a connector, or a "prioritise A over B" sentence.
    conn = re.search(_TRADE_CONNECTORS, s)
    if len(structs) >= 2 and conn and (_has(_SPARE + "|" + _PRIORITISE + r"|\bcoverage\b|\bcover\b|"
                                            + _LESS + "|" + _MORE, s[:conn.start()])):
        return _trade_off(raw, s, conn, resolved)

    # Delivery words count only without a structure or a metric: "fewer MU" is about the plan, while
    # "less dose to the larynx" is about an organ even though "less" also appears in "less modulation".
    delivery = [a for p, a in _DELIVERY_ASPECTS if _has(p, s)]
    if delivery and not metrics and not structs:
        return _delivery(raw, s, delivery)

    # Past this point every request needs exactly one structure.
    if not structs:
        if unknown and (metrics or _values(s) or _has(r"\bcoverage\b|" + _SPARE, s)):
            close = _close_names(unknown[0], names)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            return Clarification(raw, f"There is no structure '{unknown[0]}' in this case.{hint} "
                                      f"Which structure do you mean?", "unknown_structure", tuple(close))
        if metrics or _values(s) or _has(r"\bcoverage\b|" + _SPARE, s):
            return Clarification(raw, f"Which structure do you mean? This case has: {', '.join(names)}.",
                                 "unknown_structure", tuple(names))
        return _not_understood(raw)
    if len(structs) > 1:
        return Clarification(raw, f"I can apply one change at a time: which first, {' or '.join(structs)}?",
                             "several_requests", tuple(structs))
    structure = structs[0]

    # Coverage in words ("more coverage of PTV63", "PTV63 is underdosed").
    pct_cov = re.search(r"(\d+(?:\.\d+)?) ?%(?: (?:coverage|cover))?(?= (?:(?:of|for|on) )?(?:the )?§s)", s) \
        or re.search(r"(?<=§s. )coverage (?:of|at) (\d+(?:\.\d+)?) ?%", s)
    if pct_cov and not metrics:
        # "95% of PTV63 ..." / "95% coverage of PTV63": the dose covering 95 % of the volume, D95%.
        metrics = [f"D{pct_cov.group(1)}%"]
        s = " ".join((s[:pct_cov.start()] + " §mz coverage " + s[pct_cov.end():]).split())
    if not metrics and _has(r"\bcoverage\b|\bcover\b|\bunderdosed?\b|\btoo cold\b|\bcold\b", s) and not _values(s):
        more, less = _has(_MORE + r"|\bunderdosed?\b|\bcold\b", s), _has(_LESS, s)
        if more and less:
            return Clarification(raw, f"Should {structure} get more or less coverage?", "conflict",
                                 ("more", "less"))
        if not more and not less:
            return Clarification(raw, f"Should {structure} get more or less coverage?", "not_understood",
                                 ("more", "less"))
        return CoverageRequest(raw, structure, "increase" if more else "decrease")

    return _goal_edit(raw, s, structure, metrics, evaluation)


def _not_understood(raw: str) -> Clarification:
    return Clarification(raw, "I did not understand that as a plan change or a question. Try e.g. 'keep the "
                              "left parotid mean under 20 Gy', 'more coverage of PTV63', 'fewer MU' or 'why is "
                              "the cord so high?'.", "not_understood")


def _question(raw: str, s: str, structs: list[str]) -> Interpretation:
    if len(structs) > 1:
        return Clarification(raw, f"Which structure should I explain first: {' or '.join(structs)}?",
                             "several_requests", tuple(structs))
    if structs:
        return Question(raw, structs[0], "dose")
    if _has(_DELIVERY_ASPECTS[0][0] + "|" + _DELIVERY_ASPECTS[2][0], s):
        return Question(raw, None, "mu")
    if _has(r"\bfail\w*\b|\bnot met\b|\bviolat\w*\b|\bmiss\w*\b|\bwrong\b|\bproblems?\b", s):
        return Question(raw, None, "failed")
    if _has(r"\bgoals?\b|\bpass\w*\b|\bmet\b|\bplan\b", s):
        return Question(raw, None, "goals")
    return _not_understood(raw)


def _trade_off(raw: str, s: str, conn: re.Match, resolved: list[tuple[_Mention, str]]) -> Interpretation:
    before, after = s[:conn.start()], s[conn.end():]
    first = [n for k, (_, n) in enumerate(resolved) if f"§s{chr(97 + k)}" in before]
    second = [n for k, (_, n) in enumerate(resolved) if f"§s{chr(97 + k)}" in after]
    if len(first) != 1 or len(second) != 1 or first[0] == second[0]:
        return Clarification(raw, "Which structure should be favoured, and which may get worse?", "conflict",
                             tuple(dict.fromkeys(first + second)))
    fav, acc = first[0], second[0]
    if _has(r"\bcoverage\b|\bcover\b", before) or (_is_target(fav) and not _has(_SPARE, before)):
        fav_aspect = "cover"
    else:
        fav_aspect = "spare"
    # The accepted structure loses coverage when it is a target, else it may take more dose.
    acc_aspect = "coverage" if (_is_target(acc) or _has(r"\bcoverage\b", after)) else "dose"
    return TradeOff(raw, fav, fav_aspect, acc, acc_aspect)


def _delivery(raw: str, s: str, aspects: list[str]) -> Interpretation:
    aspects = list(dict.fromkeys(aspects))
    # "fewer MU" often comes with "less modulation" in one breath: both mean the same change (MU grow
    # with modulation), so they count as one MU request; other pairs are asked about.
    if len(aspects) > 1 and not (set(aspects) == {"mu", "modulation"} and _has(r"\bmus?\b|\bmonitor", s)):
        return Clarification(raw, f"Which should I reduce first: {' or '.join(aspects)}?", "several_requests",
                             tuple(aspects))
    aspect = "mu" if "mu" in aspects else aspects[0]
    # "no more than 900 MU" contains "more" but asks for a limit, not for more MU.
    less, more = _has(_LESS, s), _has(_MORE, s) and not _has(r"\bno more than\b|\bnot more than\b", s)
    vals = [v for v in _values(s) if v[1] in (None, "MU")]
    limit = None
    if vals:
        if _has(_GE_WORDS, s) and not _has(_LE_WORDS, s):
            return Clarification(raw, f"Should the {aspect} be at most {vals[0][0]:g}? A lower limit on "
                                      f"{aspect} is not supported.", "conflict", ("at most",))
        if not _has(_LE_WORDS, s) and not less:
            return Clarification(raw, f"Should the {aspect} be at most {vals[0][0]:g}?", "missing_comparator",
                                 ("at most",))
        limit = vals[0][0]
        return DeliveryRequest(raw, aspect, "decrease", limit)
    if less and more:
        return Clarification(raw, f"Should the {aspect} go up or down?", "conflict", ("up", "down"))
    if more:
        return DeliveryRequest(raw, aspect, "increase")
    if less:
        return DeliveryRequest(raw, aspect, "decrease")
    return Clarification(raw, f"Should the {aspect} go up or down?", "not_understood", ("up", "down"))


def _existing_goals(evaluation: Any, structure: str) -> list[Goal]:
    results = getattr(evaluation, "results", None) or []
    return [r.goal for r in results if getattr(r, "goal", None) is not None
            and structure.lower() in _result_structure(r)]


def _goal_edit(raw: str, s: str, structure: str, metrics: list[str], evaluation: Any) -> Interpretation:
    """The goal-edit branch: metric, comparator, value and unit from the masked sentence ``s``."""
    # A metric word ("mean", "max") unless it is "max 20 Gy" used as a comparator after another metric.
    words_metric: list[tuple[str, int, bool]] = []
    for pattern, name in _METRIC_WORDS:
        for m in re.finditer(pattern, s):
            follows_number = re.match(r" (?:of )?\d", s[m.end():]) is not None
            as_comparator = name in ("Dmax", "Dmin") and m.group(0) in ("max", "maximum", "min", "minimum") \
                and follows_number
            words_metric.append((name, m.start(), as_comparator))
    # "mean max 20 Gy": "max" before a number is a comparator when another metric is named, else the metric.
    others = metrics + [n for n, _, c in words_metric if not c]
    le_extra = ge_extra = False
    if others:
        le_extra = any(c and n == "Dmax" for n, _, c in words_metric)
        ge_extra = any(c and n == "Dmin" for n, _, c in words_metric)
        words_metric = [w for w in words_metric if not w[2]]
    all_metrics = list(dict.fromkeys(metrics + [n for n, _, _ in sorted(words_metric, key=lambda x: x[1])]))
    le = _has(_LE_WORDS, s) or le_extra
    ge = (_has(_GE_WORDS, s) and not _has(r"\bno more than\b|\bnot more than\b", s)) or ge_extra
    values = [v for v in _values(s)]
    priority = _priority(s)
    less = _has(_LESS + r"|\btighten\b|" + _SPARE, s)
    more = _has(_MORE + r"|\brelax\b|\bloosen\b|\ballow\b", s)

    if len(all_metrics) > 1:
        return Clarification(raw, f"Which metric of {structure}: {' or '.join(all_metrics)}?", "several_requests",
                             tuple(all_metrics))
    metric = all_metrics[0] if all_metrics else None
    if metric is None:
        existing = sorted({g.metric for g in _existing_goals(evaluation, structure)})
        if len(existing) == 1 and (values or less or more):
            # The only goal on this structure is what "its limit" refers to: no guess involved.
            metric = existing[0]
    if metric is None:
        if not values and less and not more and not _is_target(structure):
            return TradeOff(raw, structure, "spare", None, None)
        if not values and not less and not more:
            return _not_understood(raw)
        options = ("D95%", "Dmin", "Dmax") if _is_target(structure) else ("Dmean", "Dmax", "D0.1cc")
        return Clarification(raw, f"Which dose of {structure}: {', '.join(options[:-1])} or {options[-1]}?",
                             "missing_metric", options)
    try:
        parsed = parse_metric(metric)
    except ValueError as exc:
        return Clarification(raw, f"{exc}. Which metric do you mean?", "unsupported_metric")

    if not values:
        if less and more or le and ge:
            return Clarification(raw, f"Should {structure} {metric} go up or down?", "conflict", ("up", "down"))
        if not less and not more:
            return _not_understood(raw)
        # Direction only: "lower the cord max" tightens an upper limit, "raise PTV D95" a lower one.
        comparator = ">=" if (_is_target(structure) and parsed.kind != "max") else "<="
        wants_lower = less and not more
        action = "tighten" if (wants_lower == (comparator == "<=")) else "relax"
        return GoalEdit(raw, structure, metric, comparator, None, parsed.unit, priority, action)

    value, unit, _ = values[0]
    if le and ge:
        return Clarification(raw, f"Should {structure} {metric} be at most or at least {value:g}?", "conflict",
                             ("at most", "at least"))
    # Two numbers for one metric ("under 40 Gy, or 45 Gy") cannot both be the limit.
    if len(values) > 1:
        opts = tuple(dict.fromkeys(f"{v:g} {u or ''}".strip() for v, u, _ in values))
        return Clarification(raw, f"Which value for {structure} {metric}: {' or '.join(opts)}?", "conflict", opts)
    comparator = "<=" if le else ">=" if ge else None
    if comparator is None and parsed.kind == "dose_at_percent" and _has(r"\bcoverage\b|\bcover", s):
        comparator = ">="  # "95% coverage with 60 Gy" states a lower limit by definition of coverage
    if comparator is None and _has(r"\btighten\b|\breduce\b|\blower\b|\bdecrease\b", s):
        comparator = "<="
    # A bare number is never given a unit: 45 may be Gy or cGy, 30 may be % or cc.
    if unit is None:
        choices = ("Gy", "cGy") if parsed.is_dose else ("%", "cc")
        return Clarification(raw, f"{value:g} in which unit: {' or '.join(choices)}?", "missing_unit", choices)
    if parsed.kind in ("volume_percent_at", "volume_cc_at") and unit in ("%", "cc"):
        # The unit fixes which volume metric is meant: V20Gy (in %) or V20Gy_cc (in cc).
        metric = f"V{parsed.parameter:g}Gy" + ("_cc" if unit == "cc" else "")
        parsed = parse_metric(metric)
    if unit != parsed.unit:
        return Clarification(raw, f"{structure} {metric} is measured in {parsed.unit}, but {value:g} {unit} was "
                                  f"given. What limit in {parsed.unit} do you mean?", "unit_mismatch", (parsed.unit,))
    # No external-beam limit is above 150 Gy: 4500 "Gy" is almost surely cGy typed as Gy, so ask.
    if (unit == "Gy" and value > 150) or (unit == "%" and value > 100):
        return Clarification(raw, f"{value:g} {unit} is implausible for {structure} {metric}. Did you mean "
                                  f"{value / 100:g} {unit}?", "implausible_value", (f"{value / 100:g} {unit}",))
    if comparator is None:
        return Clarification(raw, f"Should {structure} {metric} be at most or at least {value:g} {unit}?",
                             "missing_comparator", ("at most", "at least"))
    # With an evaluation, say how the edit relates to the goal already there (tighter, looser or new).
    action = "set"
    existing = [g for g in _existing_goals(evaluation, structure)
                if g.metric.lower() == metric.lower() and g.comparator == comparator]
    if evaluation is not None:
        if not existing:
            action = "add"
        else:
            stricter = value < existing[0].value if comparator == "<=" else value > existing[0].value
            action = "tighten" if stricter else "relax" if value != existing[0].value else "set"
    return GoalEdit(raw, structure, metric, comparator, value, unit, priority, action)


# ---------------------------------------------------------------------------------------------
# Answers

def _deliverability(evaluation: Any) -> dict[str, Any]:
    """Deliverability figures of a :class:`~twinrt.planning.evaluation.PlanEvaluation` (``{}`` if none)."""
    deliv = getattr(evaluation, "deliverability", None)
    return deliv if isinstance(deliv, dict) else {}


def _result_structure(result: GoalResult) -> set[str]:
    """Names a goal result answers to: the goal's structure and the case structure it was resolved to."""
    names = {result.goal.structure.lower()}
    extra = getattr(result, "extra", None) or {}
    if extra.get("case_structure"):
        names.add(str(extra["case_structure"]).lower())
    return names


def answer(interpretation: Interpretation, evaluation: Any = None) -> str:
    """An answer drawn from the plan evaluation for a :class:`Question`; else the confirmation text.

    :param interpretation: the result of :func:`parse_feedback`.
    :param evaluation: the plan evaluation (``results``: list of
        :class:`~twinrt.planning.goals.GoalResult`; optionally total MU).
    :return: plain-text answer; it only restates what the evaluation holds and never invents figures.
    """
    if not isinstance(interpretation, Question):
        return interpretation.confirmation_text()
    if evaluation is None:
        return "There is no plan evaluation yet: compute a plan first, then ask again."
    results: list[GoalResult] = list(getattr(evaluation, "results", None) or [])
    if interpretation.topic == "mu":
        deliv = _deliverability(evaluation)
        if not isinstance(deliv.get("total_mu"), (int, float)):
            return "The evaluation does not report monitor units for this plan (no sequenced plan was evaluated)."
        text = f"The plan needs {deliv['total_mu']:.0f} MU per fraction"
        if isinstance(deliv.get("n_segments"), int):
            text += f" in {deliv['n_segments']} segments"
        if isinstance(deliv.get("n_beams"), int):
            text += f" over {deliv['n_beams']} beams"
        text += "."
        if isinstance(deliv.get("delivery_time_s"), (int, float)):
            text += f" Estimated delivery time {deliv['delivery_time_s'] / 60:.1f} min."
        return text
    if interpretation.topic in ("failed", "goals"):
        chosen = [r for r in results if r.passed is False] if interpretation.topic == "failed" else results
        if not chosen:
            return "All goals are met." if interpretation.topic == "failed" and results else \
                "The evaluation has no goals."
        return " ".join(r.explanation or r.goal.describe() for r in chosen)
    name = interpretation.structure or ""
    mine = [r for r in results if name.lower() in _result_structure(r)]
    if not mine:
        return (f"There is no goal for {name} in this plan's goal set, so the optimiser was not asked to limit "
                f"its dose. Add one, e.g. '{name} Dmax <= 45 Gy', to have it spared.")
    failed = [r for r in mine if r.passed is False]
    lines = [r.explanation or r.goal.describe() for r in mine]
    if failed:
        lines.append(f"{len(failed)} of {len(mine)} goal(s) on {name} are not met; a tighter goal or a higher "
                     f"priority, at some cost to other goals, may lower it.")
    else:
        lines.append(f"All {len(mine)} goal(s) on {name} are met.")
    return " ".join(lines)


def interpretation_from_dict(data: dict[str, Any], structures: Iterable[Any], text: str = "") -> Interpretation:
    """Rebuild an :class:`Interpretation` from :meth:`Interpretation.to_dict` output (e.g. a language model's).

    Structure names are checked against the case: a name that is not there becomes a
    :class:`Clarification`, so that nothing outside the case is ever edited.

    :param data: ``{"kind": ..., fields...}``.
    :param structures: the case's structure names (or objects with ``name``).
    :param text: the original feedback.
    """
    names = _structure_names(structures)
    by_lower = {n.lower(): n for n in names}
    kinds = {c.__name__: c for c in (GoalEdit, TradeOff, CoverageRequest, DeliveryRequest, Question, Clarification)}
    cls = kinds.get(str(data.get("kind", "")))
    if cls is None:
        return _not_understood(text)
    fields = {k: v for k, v in data.items() if k != "kind" and k in cls.__dataclass_fields__ and k != "text"}
    for key in ("structure", "favour", "accept"):
        val = fields.get(key)
        if val is None:
            continue
        if str(val).lower() not in by_lower:
            close = _close_names(str(val), names)
            return Clarification(text, f"There is no structure '{val}' in this case. Which structure do you mean?",
                                 "unknown_structure", tuple(close))
        fields[key] = by_lower[str(val).lower()]
    if "options" in fields:
        fields["options"] = tuple(fields["options"] or ())
    try:
        result = cls(text, **fields)
        if isinstance(result, GoalEdit) and result.value is not None:
            result.to_goal()  # validates metric, comparator and priority
    except (TypeError, ValueError) as exc:
        return Clarification(text, f"The interpretation was not valid ({exc}); please rephrase.", "not_understood")
    return result


#: Weight multiplier for "more" (and 1 / it for "less") when feedback names no number: one doubling
#: is a visible but reversible step; the user can repeat the request to go further.
FEEDBACK_FACTOR = 2.0
#: Fluence smoothness weight set by the first "fewer MU" / "less modulation" when the plan had none.
#: Smoothness is comparable with objective weights (see :mod:`twinrt.planning.optimizer`); on the
#: test phantom 10 cut the MU by 18 % and 100 by 32 % at equal target coverage. Each further request
#: multiplies it by :data:`FEEDBACK_FACTOR`; "more MU" divides it (below the start value it becomes 0).
SMOOTHNESS_START = 30.0
#: "Fewer segments" multiplies the intensity levels of leaf sequencing by this (at least 3 levels);
#: "more segments" divides them by it.
LEVELS_FACTOR = 0.7


def to_edits(interpretation: Interpretation, setup: Any = None) -> list[Any]:
    """The agent's :class:`~twinrt.planning.agent.Edit` objects for a confirmed interpretation.

    Mapping (objective edits go through :func:`~twinrt.planning.agent.apply_edits`, goal edits
    through :func:`~twinrt.planning.agent.apply_goal_edits`):

    * :class:`GoalEdit` with a value: ``add_goal`` (preceded by ``remove_goal`` of the same
      structure and metric when it tightens or relaxes an existing goal);
      without a value: ``scale_weight`` ×:data:`FEEDBACK_FACTOR` (tighten) or ÷ (relax) on the structure.
    * :class:`TradeOff`: ``scale_weight`` ×factor on ``favour``, ÷factor on ``accept``.
    * :class:`CoverageRequest`: ``scale_weight`` ×factor (increase) or ÷factor (decrease) on the target.
    * :class:`DeliveryRequest`: a ``set_setup`` edit of the plan set-up (applied with
      :func:`~twinrt.planning.agent.apply_setup_edits`): fewer MU or less modulation (also with a
      limit: "keep MU under 800") raise the fluence smoothness weight (to :data:`SMOOTHNESS_START`,
      then ×:data:`FEEDBACK_FACTOR`); more lowers it; fewer segments scale the intensity levels by
      :data:`LEVELS_FACTOR`, more by its inverse. A limit is not a constraint of the optimiser: the
      caller checks it on the new plan and says whether it holds.
    * :class:`Question`, :class:`Clarification`: no edit (``[]``).

    :param interpretation: a result of :func:`parse_feedback` the user confirmed.
    :param setup: the plan's :class:`~twinrt.planning.workflow.PlanSetup` (for delivery requests;
        default ``PlanSetup()``).
    :return: list of ``Edit``.
    """
    # Imported here: the agent pulls in the optimiser, which the parser itself does not need.
    from twinrt.planning.agent import Edit

    reason = f"user feedback: {interpretation.text}" if interpretation.text else "user feedback"
    if isinstance(interpretation, GoalEdit):
        if interpretation.value is None:
            f = FEEDBACK_FACTOR if interpretation.action == "tighten" else 1.0 / FEEDBACK_FACTOR
            return [Edit("scale_weight", interpretation.structure, factor=f, reason=reason)]
        edits = []
        if interpretation.action in ("tighten", "relax"):
            edits.append(Edit("remove_goal", interpretation.structure, metric=interpretation.metric, reason=reason))
        edits.append(Edit("add_goal", interpretation.structure, metric=interpretation.metric,
                          value=interpretation.value, comparator=interpretation.comparator or "",
                          priority=interpretation.priority, reason=reason))
        return edits
    if isinstance(interpretation, TradeOff):
        edits = [Edit("scale_weight", interpretation.favour, factor=FEEDBACK_FACTOR, reason=reason)]
        if interpretation.accept is not None:
            edits.append(Edit("scale_weight", interpretation.accept, factor=1.0 / FEEDBACK_FACTOR, reason=reason))
        return edits
    if isinstance(interpretation, CoverageRequest):
        f = FEEDBACK_FACTOR if interpretation.direction == "increase" else 1.0 / FEEDBACK_FACTOR
        return [Edit("scale_weight", interpretation.structure, factor=f, reason=reason)]
    if isinstance(interpretation, DeliveryRequest):
        from twinrt.planning.workflow import PlanSetup

        setup = setup if setup is not None else PlanSetup()
        if interpretation.aspect == "segments":
            levels = int(setup.levels)
            new = max(3, int(round(levels * LEVELS_FACTOR))) if interpretation.direction == "decrease" \
                else min(100, max(levels + 1, int(round(levels / LEVELS_FACTOR))))
            return [Edit("set_setup", "plan", parameter="levels", value=float(new),
                         reason=f"{reason}: intensity levels {levels} → {new}")]
        smooth = float(setup.smoothness_weight)
        if interpretation.direction == "decrease":
            new_s = SMOOTHNESS_START if smooth < SMOOTHNESS_START else smooth * FEEDBACK_FACTOR
        else:
            new_s = smooth / FEEDBACK_FACTOR if smooth / FEEDBACK_FACTOR >= SMOOTHNESS_START else 0.0
        return [Edit("set_setup", "plan", parameter="smoothness_weight", value=new_s,
                     reason=f"{reason}: fluence smoothness weight {smooth:g} → {new_s:g}")]
    return []
