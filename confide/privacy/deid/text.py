"""Offline free-text de-identification: find identifiers in clinical notes and replace them.

Everything here is rule-based and runs without a model download: regular expressions
(compiled once, at import) with keyword context, plus embedded dictionaries of common first
names and surnames. Each detection is a :class:`Span` over the *input* text with one of the
14 :data:`TYPES`; overlapping detections are resolved (longest first, then by detector
priority), so the spans returned are sorted and disjoint.

Replacement is either a typed placeholder (``[NAME]``, ``[DATE]``, ...) or, with
``mode="pseudonym"``, a consistent pseudonym ``TYPE-xxxxxxxx`` whose suffix is the first
8 hex digits of HMAC-SHA256(secret, type + NUL + normalised value): the same value gets
the same pseudonym under one secret (so notes of one patient stay linkable) and an
unrelated one under another secret.

``backend="presidio"`` uses Microsoft Presidio when ``presidio-analyzer`` is installed
(it is not a dependency of Confide); the built-in detectors still cover the types
Presidio has no recogniser for (AGE, MRN, ZIP, FAX). See docs/deid-text.md.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from confide.privacy.deid.errors import DeidError

__all__ = [
    "PLACEHOLDERS",
    "TYPES",
    "DeidError",
    "PresidioUnavailableError",
    "ScrubResult",
    "Scrubber",
    "Span",
    "scrub",
]

TYPES: tuple[str, ...] = (
    "NAME",
    "DATE",
    "AGE",
    "PHONE",
    "FAX",
    "EMAIL",
    "SSN",
    "MRN",
    "ACCOUNT",
    "LICENSE",
    "ZIP",
    "ADDRESS",
    "URL",
    "IP",
)
PLACEHOLDERS: dict[str, str] = {t: f"[{t}]" for t in TYPES}

Mode = Literal["placeholder", "pseudonym"]
Backend = Literal["builtin", "presidio"]


class PresidioUnavailableError(DeidError):
    """``backend="presidio"`` was asked for but Presidio is not installed."""


@dataclass(frozen=True)
class Span:
    """One detected identifier: ``text[start:end]`` of the input text, of type ``type``."""

    start: int
    end: int
    type: str

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "type": self.type}


@dataclass
class ScrubResult:
    """The scrubbed text and the spans (over the input text) that were replaced."""

    text: str
    spans: list[Span]


# --------------------------------------------------------------------------- dictionaries

# Common first names (US and UK) and surnames. Ambiguous ones (also ordinary words) only count
# as names next to another name token or after a name context ("Dr.", "seen by", ...).
_FIRST = """
James John Robert Michael William David Richard Joseph Thomas Charles Christopher Daniel
Matthew Anthony Mark Donald Steven Paul Andrew Joshua Kenneth Kevin Brian George Timothy Ronald
Edward Jason Jeffrey Ryan Jacob Gary Nicholas Eric Jonathan Stephen Larry Justin Scott Brandon
Benjamin Samuel Gregory Alexander Frank Patrick Raymond Jack Dennis Jerry Tyler Aaron Jose Adam
Nathan Henry Douglas Zachary Peter Kyle Ethan Walter Noah Jeremy Christian Keith Roger Terry
Gerald Harold Sean Austin Carl Arthur Lawrence Dylan Jesse Jordan Bryan Billy Joe Bruce Gabriel
Logan Albert Willie Alan Juan Wayne Elijah Randy Roy Vincent Ralph Eugene Russell Bobby Mason
Philip Louis Harry Oliver Charlie Alfie Freddie Archie Leo Oscar Theo Arlo Liam Lucas Hugo
Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica Sarah Karen Lisa Nancy Betty
Margaret Sandra Ashley Kimberly Emily Donna Michelle Carol Amanda Dorothy Melissa Deborah
Stephanie Rebecca Sharon Laura Cynthia Kathleen Amy Angela Shirley Anna Brenda Pamela Emma
Nicole Helen Samantha Katherine Christine Debra Rachel Carolyn Janet Catherine Maria Heather
Diane Ruth Julie Olivia Joyce Virginia Victoria Kelly Lauren Christina Joan Evelyn Judith Megan
Andrea Cheryl Hannah Jacqueline Martha Gloria Teresa Ann Sara Madison Frances Kathryn Janice
Jean Abigail Alice Judy Sophia Denise Amber Doris Marilyn Danielle Beverly Isabella Theresa
Diana Natalie Brittany Charlotte Marie Kayla Alexis Lori Amelia Isla Ava Mia Ella Poppy Lily
Freya Sophie Chloe Jessica Ruby Evie Florence Harriet Eleanor Imogen Zara Aisha Fatima Mohammed
Muhammad Ahmed Ali Omar Priya Raj Rahul Anil Sunita Wei Li Ming Hiroshi Yuki Carlos Luis Miguel
Sofia Lucia Elena Ana Pedro Antonio Francisco Marco Giulia Luca Hans Klaus Anke Ingrid Lars Sven
Jane Janet Susan Joan Jill Julia Kate Katie Claire Clare Fiona Gemma Kirsty Lorraine Nadia
Graham Ian Neil Nigel Colin Trevor Derek Malcolm Stuart Gordon Alistair Hamish Rhys Dafydd Ewan
"""

_LAST = """
Smith Johnson Williams Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez
Wilson Anderson Taylor Thomas Moore Jackson Martin Lee Perez Thompson Harris Sanchez Clark
Ramirez Lewis Robinson Walker Allen Wright Torres Nguyen Hill Flores Adams Nelson Baker Hall
Rivera Campbell Mitchell Carter Roberts Gomez Phillips Evans Turner Diaz Parker Cruz Edwards
Collins Reyes Stewart Morris Morales Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper Peterson
Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson Watson Brooks Chavez Bennett Gray
Mendoza Ruiz Hughes Price Alvarez Castillo Sanders Patel Myers Ross Foster Jimenez Powell
Jenkins Perry Russell Sullivan Bell Coleman Butler Henderson Barnes Gonzales Fisher Vasquez
Simmons Romero Jordan Patterson Alexander Hamilton Graham Reynolds Griffin Wallace Moreno West
Cole Hayes Bryant Herrera Gibson Ellis Tran Medina Aguilar Stevens Murray Ford Castro Marshall
Owens Harrison Fernandez McDonald Woods Washington Kennedy Wells Vargas Henry Chen Freeman
Webb Tucker Guzman Burns Crawford Olson Simpson Porter Hunter Gordon Mendez Silva Shaw Snyder
Mason Dixon Munoz Hunt Hicks Holmes Palmer Wagner Black Robertson Boyd Rose Stone Salazar Fox
Warren Mills Meyer Rice Schmidt Garza Daniels Ferguson Nichols Stephens Soto Weaver Ryan
Gardner Payne Grant Dunn Kelley Spencer Hawkins Arnold Pierce Vazquez Hansen Peters Santos
Hart Bradley Knight Elliott Cunningham Duncan Armstrong Hudson Carroll Lane Riley Andrews
Ray Berry Perkins Hoffman Johnston Matthews Pena Richards Willis Carpenter Lawrence Sandoval
Wood Hughes Lloyd Price Davies Evans Roberts Edwards Jenkins Owen Thomas Morgan Griffiths
Hughes Lewis Walsh Byrne Kelly Doyle Murphy Brennan Gallagher Quinn Fitzgerald Keane Kowalski
Nowak Novak Muller Schneider Fischer Weber Becker Wagner Schulz Koch Richter Wolf Schroeder
Rossi Russo Ferrari Esposito Bianchi Romano Colombo Ricci Marino Greco Bruno Gallo Conti
Wang Zhang Liu Yang Huang Zhao Wu Zhou Xu Sun Ma Zhu Hu Guo Lin Tanaka Suzuki Takahashi
Watanabe Yamamoto Nakamura Sato Singh Kumar Sharma Gupta Shah Khan Ahmed Hussain Rahman
Okafor Mensah Okonkwo Adeyemi Nkosi Dubois Laurent Lefebvre Moreau Fournier Girard Bonnet
Keller Fischer Hartmann Lindqvist Andersson Johansson Larsson Nilsson Eriksson Jensen Nielsen
OBrien O'Brien O'Connor O'Neill O'Sullivan McCarthy McLaughlin MacDonald MacKenzie Fraser
"""

# Tokens that are ordinary words as well as names: a name only beside another name token.
_AMBIGUOUS_WORDS = """
May Will Bill June April August Art Mark Grace Hope Faith Rose Joy Dawn Ivy Holly Jack
Brown White Green Black Young King Wood Hill Bell Stone Fox Cook Gray Hall Lane Ray
Price Rice Hunt West Cole Rose Ford Long Reed Mills Banks Wells Park Lee Ma Li Hu Sun Wu
Xu Christian Jordan Henry Thomas Wallace Warren Grant Mason Graham Gordon Alexander
Hamilton Washington Jean Joy Sandy Summer Autumn Amber Ruby Crystal Frank Carol Pat Sue
Dean Chase Bruno Ali Ana Marie Ann Ward Lloyd Owen Cruz Diaz Lawrence Russell Ryan Kelly
Murray Bailey Palmer Henderson Hunter Porter Dixon Walker Baker Carter Turner Parker
Ross Ellis
"""
_AMBIGUOUS = frozenset(_AMBIGUOUS_WORDS.split())

# Capitalised words that are never (part of) a person's name in a note.
_STOP_WORDS = """
The A An And Or Of In On At To For From With By Is Was Were Be Has Had Have He She They
We His Her Their Our This That These Those It Its If Then Not No Yes Please Thanks Thank
Dear Patient Patients Pt Doctor Dr Mr Mrs Ms Miss Mx Prof Nurse Sister Sir Madam Team
Unit Ward Hospital Clinic Centre Center Medical Health Healthcare Trust Foundation
Surgery Practice General Royal University Memorial Community Regional County State
National Saint St Cardiology Oncology Neurology Radiology Pathology Surgery Orthopaedics
Orthopedics Urology Dermatology Psychiatry Paediatrics Pediatrics Gastroenterology
Endocrinology Nephrology Rheumatology Haematology Hematology Emergency Department
Service Services Admission Discharge Summary Note Notes Referral Letter Message Report
Plan Assessment History Examination Exam Medications Medication Allergies Diagnosis
Diagnoses Impression Follow Followup Review Labs Vitals Phone Fax Email Tel Mobile
Address Date Time Age Sex Male Female Name DOB MRN SSN Monday Tuesday Wednesday Thursday
Friday Saturday Sunday January February March April May June July August September
October November December Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Today
Tomorrow Yesterday Morning Evening Night Street Road Avenue Lane Drive Type Diabetes
Hypertension Covid Covid19 Tylenol Aspirin Metformin Insulin Lisinopril ECG EKG CT MRI
Xray BP HR RR Hb HbA1c Chief Complaint Subjective Objective Social Family Past Signed
Electronically Sincerely Regards Kind Best Yours Faithfully Cc Re Subject Attention
Insurance Policy Account License Licence Member Plan Group Id Number No Room Bed Floor
Follow Return Call Called Spoke Left Seen Reviewed Refer Referred Dictated Attending
Resident Continue Start Stop Increase Decrease Take Given Advised Denies Reports
Presents Presented Blood Pressure Heart Rate Temperature Weight Height Pulse Oxygen
Saturation Glucose Lab Primary Care Physician Provider Consultant Registrar Specialist
Therapist Pharmacist Mother Father Son Daughter Wife Husband Partner Brother Sister
Carer Caregiver Contact Kin NOK English British American Spanish French Catholic
Christian Muslim Jewish Hindu Buddhist Will Bill May Mark Grace Hope Faith
"""
_STOP = frozenset(_STOP_WORDS.split())

_FIRST_SET = frozenset(_FIRST.split())
_LAST_SET = frozenset(_LAST.split())
_NAME_SET = _FIRST_SET | _LAST_SET

# --------------------------------------------------------------------------- patterns

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?"
    r"|JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC)"
)
_DAY = r"(?:0?[1-9]|[12]\d|3[01])"
_MON_NUM = r"(?:0?[1-9]|1[0-2])"
_YEAR4 = r"(?:1[89]\d\d|20\d\d)"
_ORD = r"(?:st|nd|rd|th)?"

_STATES = (
    "AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|"
    "NJ|NM|NY|NC|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|PR"
)
_STATE_NAMES = (
    "Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Georgia|"
    "Hawaii|Idaho|Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|"
    "Michigan|Minnesota|Mississippi|Missouri|Montana|Nebraska|Nevada|New Hampshire|New Jersey|"
    "New Mexico|New York|North Carolina|North Dakota|Ohio|Oklahoma|Oregon|Pennsylvania|"
    "Rhode Island|South Carolina|South Dakota|Tennessee|Texas|Utah|Vermont|Virginia|Washington|"
    "West Virginia|Wisconsin|Wyoming"
)
_UK_POSTCODE = r"(?:[A-Z]{1,2}\d[A-Z\d]?\s?\d[ABD-HJLNP-UW-Z]{2})"
_US_ZIP = r"(?:\d{5}(?:-\d{4})?)"

_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Way"
    r"|Terrace|Ter|Close|Crescent|Cres|Square|Sq|Gardens|Gdns|Parkway|Pkwy|Highway|Hwy|Circle"
    r"|Cir|Trail|Trl|Row|Mews|Hill|Grove|Walk|Well|Wells|Park|Green|Rise|View|Vale|Gate|Yard"
    r"|Wharf|Quay|Heights|Mount|Ridge|Crossing|Junction|Station|Ferry|Ford|Fork|Forks|Harbor"
    r"|Harbour|Haven|Hollow|Landing|Meadow|Meadows|Mill|Mills|Mission|Pass|Path|Pike|Plaza"
    r"|Point|Port|Rapids|Rest|Run|Shore|Shores|Spring|Springs|Stream|Summit|Track|Turnpike"
    r"|Valley|Village|Ville|Vista|Loop|Alley|Bend|Bridge|Brook|Common|Corner|Cove|Creek"
    r"|Estate|Estates|Field|Fields|Garden|Glen|Court|Expressway|Freeway|Manor|Orchard|Oval"
    r"|Parade|Chase|End|Fold|Croft|Hey|Lea|Lodge|Side|Wynd|Approach|Broadway|Embankment)"
)
_UNIT = (
    r"(?:,?[ \t]*(?:Unit|Apt\.?|Apartment|Suite|Ste\.?|Flat|Fl\.?|Room|Rm\.?|#)[ \t]*#?[ \t]*"
    r"[A-Z0-9]{1,6}\b)"
)

_NAME_TOKEN = r"(?:[A-Z][a-zA-Z'\-]*[a-z]\d{0,4})"
_INITIAL = r"(?:[A-Z]\.\s?)"
_NAME_SEQ = rf"(?:{_INITIAL}{{0,2}}{_NAME_TOKEN}(?:[ \t]+{_INITIAL}{{0,2}}{_NAME_TOKEN}){{0,3}})"

_STATE_BEFORE = re.compile(rf"\b(?:{_STATES}|{_STATE_NAMES})\.?,?[ \t]+$")
_KW_SEP = r"(?:\s*(?:is|was|of)\s+|\s*[:#=]\s*|\s+)(?:#\s*)?"

Check = Callable[["re.Match[str]", str], "str | None"]


@dataclass(frozen=True)
class _Detector:
    type: str
    regex: re.Pattern[str]
    group: int | str = 0
    priority: int = 50  # lower wins a tie between spans of the same length
    check: Check | None = None
    gate: tuple[str, ...] = ()  # skip unless one of these occurs in the lower-cased text


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _age_check(m: re.Match[str], text: str) -> str | None:
    v = m.group("v")
    return "AGE" if 89 < int(v) <= 125 else None


def _min_digits(n: int, typ: str) -> Check:
    def check(m: re.Match[str], text: str) -> str | None:
        return typ if _digits(m.group("v")) >= n else None

    return check


_PHONE_KW = re.compile(r"(fax|tel|phone|ph|mobile|cell|call|pager|bleep|direct)", re.IGNORECASE)


def _phone_check(m: re.Match[str], text: str) -> str | None:
    v = m.group("v")
    d = _digits(v.split("x")[0].split("ext")[0])
    if not 7 <= d <= 15:
        return None
    before = text[max(0, m.start("v") - 30) : m.start("v")]
    found = list(_PHONE_KW.finditer(before))
    # the nearest keyword types the number, unless another number sits in between
    if (
        found
        and found[-1].group(1).lower() == "fax"
        and not any(c.isdigit() for c in before[found[-1].end() :])
    ):
        return "FAX"
    return "PHONE"


def _c(pattern: str, first: str = "") -> re.Pattern[str]:
    """Compile; ``first`` is the set of possible first characters (a fast-scan prefix)."""
    return re.compile(f"(?=[{first}])(?:{pattern})" if first else pattern)


_DETECTORS: tuple[_Detector, ...] = (
    # ---- contact and network
    _Detector(
        "URL",
        _c(
            r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"'\[\]()]+[^\s<>\"'\[\]().,;:!?]",
            "hfw",
        ),
        0,
        12,
        gate=("://", "www."),
    ),
    _Detector(
        "IP",
        _c(
            r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
            r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]*\d)",
            r"\d",
        ),
        0,
        12,
    ),
    # ---- phone and fax (FAX when the nearest keyword before it is "fax")
    _Detector(
        "PHONE",
        _c(
            r"(?<![\w+/.-])(?P<v>(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
            r"(?:[ \t]*(?:x|ext\.?|extension)[ \t]*\d{1,6})?)(?![\w/-])",
            r"\d(+",
        ),
        "v",
        30,
        _phone_check,
    ),
    _Detector(
        "PHONE",
        _c(
            r"(?<![\w+])(?P<v>\+\d{1,3}[ .-]?(?:\(0?\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
            r"(?:[ \t]*(?:x|ext\.?|extension)[ \t]*\d{1,6})?)(?![\w-])",
            "+",
        ),
        "v",
        30,
        _phone_check,
    ),
    _Detector(
        "PHONE",
        _c(r"(?<![\w+./-])(?P<v>0\d{2,4}[ -]?\d{3,4}[ -]?\d{3,4})(?![\w/-]|\.\d)", "0"),
        "v",
        35,
        _phone_check,
    ),
    _Detector(
        "PHONE",
        _c(
            r"(?i:\b(?:tel|phone|ph|mobile|cell|fax|call(?:ed)?(?:\s+(?:on|at))?|pager|contact)\b)"
            r"[^\d\n]{0,12}?(?P<v>\d{7,11})\b",
            "TtPpMmCcFf",
        ),
        "v",
        30,
        _phone_check,
        gate=("tel", "phone", "ph", "mobile", "cell", "fax", "call", "pager", "contact"),
    ),
    # ---- national and record numbers
    _Detector("SSN", _c(r"(?<![\w-])(?P<v>\d{3}-\d{2}-\d{4})(?![\w-])", r"\d"), "v", 20),
    _Detector(
        "SSN",
        _c(
            r"(?i:\b(?:ssn|ss#|social\s+security(?:\s+(?:number|no\.?|num|#))?))"
            + _KW_SEP
            + r"(?P<v>\d{9}|\d{3}[ .-]\d{2}[ .-]\d{4})\b",
            "Ss",
        ),
        "v",
        5,
        gate=("ss", "social"),
    ),
    _Detector(
        "MRN",
        _c(
            r"(?i:\b(?:mrn|mr\s*#|medical\s+record(?:\s+(?:number|no\.?|num|#))?|chart"
            r"\s+(?:number|no\.?|#)|hospital\s+(?:number|no\.?|#|id)|nhs\s+(?:number|no\.?|#)"
            r"|patient\s+(?:id|identifier|number|no\.?)|record\s+(?:number|no\.?|#)|unit\s+number"
            r"|case\s+(?:number|no\.?|#)|encounter\s+(?:id|number|no\.?)))"
            + _KW_SEP
            + r"(?P<v>\d{3}[ ]\d{3}[ ]\d{4}\b|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}"
            r"-[0-9a-f]{12}|[A-Z]{0,4}-?\d[\dA-Z-]{2,18}\b)",
            "MmCcHhNnPpRrUuEe",
        ),
        "v",
        4,
        _min_digits(4, "MRN"),
        gate=("mr", "record", "chart", "hospital", "nhs", "patient", "unit", "case", "encounter"),
    ),
    _Detector(
        "ACCOUNT",
        _c(
            r"(?i:\b(?:account|acct|a/c|billing|invoice|iban|card)\.?(?:\s+(?:number|no\.?|num"
            r"|#|id))?|\b(?:insurance|policy|plan|member|subscriber|group|beneficiary|medicare"
            r"|medicaid|health\s+plan|insurer|payer|claim|certificate\s+of\s+coverage)"
            r"(?:\s+(?:id|number|no\.?|num|#)){1,2})"
            + _KW_SEP
            + r"(?P<v>[A-Z0-9](?:[A-Z0-9-]|[ ](?=\d{4}\b)){3,33}\b)",
            "AaBbIiCcPpMmSsGgHhDd",
        ),
        "v",
        6,
        _min_digits(4, "ACCOUNT"),
        gate=(
            "acc",
            "acct",
            "a/c",
            "bill",
            "invoice",
            "iban",
            "card",
            "insur",
            "polic",
            "plan",
            "member",
            "subscriber",
            "group",
            "benefic",
            "medica",
            "payer",
            "claim",
            "coverage",
        ),
    ),
    _Detector("ACCOUNT", _c(r"(?<![\w-])(?P<v>(?:\d{4}[ -]){3}\d{4})(?![\w-])", r"\d"), "v", 25),
    _Detector(
        "LICENSE",
        _c(
            r"(?:(?i:\b(?:driver'?s?\s+licen[cs]e|driving\s+licen[cs]e|licen[cs]e|lic\.|dea"
            r"|npi|passport|registration|vehicle\s+(?:reg(?:istration)?|plate)|licen[cs]e\s+plate"
            r"|permit))|\bD\.?L\.?)(?i:\s+(?:number|no\.?|num|#|id))?"
            + _KW_SEP
            + r"(?P<v>[A-Z0-9][A-Z0-9-]{3,20}\b)",
            "DdLlPpNnRrVv",
        ),
        "v",
        7,
        _min_digits(3, "LICENSE"),
        gate=("dri", "lic", "dea", "npi", "passport", "regist", "plate", "permit", "d.l", "dl"),
    ),
    _Detector("LICENSE", _c(r"(?<![\w-])(?P<v>[A-Z]\d{7,8}[A-Z]?)(?![\w-])", "A-Z"), "v", 40),
    # ---- ages over 89 (span: the number)
    _Detector(
        "AGE",
        _c(
            r"(?<!\d)(?P<v>\d{2,3})(?:\s*|-)(?:years?|yrs?|y)(?:\s*|-)(?:old|o\b)"
            r"|(?<!\d)(?P<v2>\d{2,3})\s*(?:y/o|y\.o\.|yo\b|years?\s+of\s+age)",
            r"\d",
        ),
        0,
        8,
        gate=("y",),
    ),
    _Detector(
        "AGE",
        _c(r"(?i:\bage[ds]?\b)\s*[:=]?\s*(?P<v>\d{2,3})\b", "Aa"),
        "v",
        8,
        _age_check,
        gate=("age",),
    ),
    # ---- dates
    _Detector(
        "DATE",
        _c(
            rf"(?<![\d/.-]){_YEAR4}[-/.]{_MON_NUM}[-/.]{_DAY}(?![\d/])"
            rf"|(?<![\d/.-]){_DAY}[/.-]{_DAY}[/.-](?:{_YEAR4}|\d\d)(?![\d/]|\.\d)"
            rf"|(?<![\d/.-]){_MON_NUM}/{_YEAR4}(?![\d/])"
            rf"|(?<![\d/.-]){_DAY}{_ORD}(?:\s+of)?[\s-]+{_MONTH}\b\.?(?:,?[\s-]+{_YEAR4}\b)?"
            rf"|(?<![\d/.-])(?:19|20)\d\d{_MON_NUM.replace('0?', '0')}{_DAY.replace('0?', '0')}"
            r"(?=T\d\d:?\d\d)",
            r"\d",
        ),
        0,
        15,
    ),
    _Detector(
        "DATE",
        _c(
            rf"\b{_MONTH}\b\.?[\s-]+{_DAY}{_ORD}\b(?:,?\s+{_YEAR4}\b)?"
            rf"|\b{_MONTH}\b\.?,?\s+{_YEAR4}\b",
            "JFMASOND",
        ),
        0,
        15,
    ),
    # ---- ZIP and postcodes
    _Detector(
        "ZIP",
        _c(rf"(?<![\w-])(?P<v>{_US_ZIP})(?![\w-])", r"\d"),
        "v",
        9,
        lambda m, text: (
            "ZIP" if _STATE_BEFORE.search(text, max(0, m.start() - 20), m.start()) else None
        ),
    ),
    _Detector(
        "ZIP",
        _c(
            r"(?i:\b(?:zip(?:\s*code)?|postal\s+code|post\s*code))\s*[:#]?\s*"
            rf"(?P<v>{_US_ZIP}|{_UK_POSTCODE}|[A-Z]{{1,2}}\d[A-Z\d]?)\b",
            "ZzPp",
        ),
        "v",
        9,
        gate=("zip", "post"),
    ),
    _Detector("ZIP", _c(r"(?<![\w-])(?P<v>\d{5}-\d{4})(?![\w-])", r"\d"), "v", 26),
    _Detector("ZIP", _c(rf"\b(?P<v>{_UK_POSTCODE})\b", "A-Z"), "v", 27),
    _Detector(
        "ZIP",
        _c(r"\b[A-Z][a-z]+, (?P<v>[A-Z]{1,2}\d{1,2}[A-Z]?)\b(?! ?\d[A-Z]{2})", "A-Z"),
        "v",
        45,
    ),
    # ---- street addresses
    _Detector(
        "ADDRESS",
        _c(
            r"(?<![\w.,/-])\d{1,5}[A-Za-z]?(?:-\d{1,5})?,?[ \t]+(?:(?:N|S|E|W|NE|NW|SE|SW|North"
            r"|South|East|West)\.?[ \t]+)?(?:(?:[A-Z][a-zA-Z'\-]*|\d+(?:st|nd|rd|th))[ \t]+){1,3}"
            + _STREET_SUFFIX
            + r"\b\.?"
            + _UNIT
            + r"?",
            r"\d",
        ),
        0,
        11,
    ),
    _Detector(
        "ADDRESS",
        _c(
            r"\b(?:Apt\.?|Apartment|Suite|Flat)[ \t]*#?[ \t]*\d{1,5}[A-Z]?\b"
            r"|\bP\.?[ ]?O\.?[ \t]+Box[ \t]+\d+\b",
            "AFSP",
        ),
        0,
        28,
    ),
)

_CAP_TOKEN = re.compile(
    r"[A-Z](?:'?[A-Z]?[a-z]+(?:[\-'][A-Z]?[a-z]+|[A-Z][a-z]+)?\d{0,4}|\.(?=[ \t][A-Z]))"
)
_TITLE_WORDS = "Dr Mr Mrs Ms Miss Mx Prof Rev Sr Doctor Nurse Professor Sister"
_TITLES = frozenset(_TITLE_WORDS.split())
# Text just before a name: "Patient:", "seen by", "Dear", "Sincerely,", "wife", ...
_CTX_COLON_WORDS = """
patient pt name from to cc attn attention signed re provider physician pcp gp attending
resident consultant nok kin caller contact guarantor subscriber insured author clinician
"""
_CTX_COLON = frozenset(_CTX_COLON_WORDS.split())
_CTX_WORD_WORDS = """
dear sincerely regards thanks cc wife husband daughter son mother father sister brother
partner carer caregiver grandson granddaughter niece nephew friend neighbour neighbor
"""
_CTX_WORD = frozenset(_CTX_WORD_WORDS.split())
_CTX_BY_WORDS = """
seen referred signed dictated reviewed examined authored transcribed taken accompanied
brought discussed visited covered approved witnessed
"""
_CTX_BY = frozenset(_CTX_BY_WORDS.split())
_CTX_SPLIT = re.compile(r"[^\w:']+")


def _name_context(text: str, start: int) -> bool:
    """Whether the text before ``start`` ends with a name context ("seen by", "Re:", ...)."""
    seg = text[max(0, start - 40) : start]
    if seg.count("\n") > 2:
        seg = seg[seg.rindex("\n", 0, seg.rindex("\n")) :]
    words = [w for w in _CTX_SPLIT.split(seg.lower().replace(":", " : ")) if w]
    if not words:
        return False
    w = words[-1]
    if w == ":":
        return len(words) > 1 and words[-2] in _CTX_COLON
    if w in _CTX_WORD:
        return True
    if w == "by":
        return len(words) > 1 and words[-2] in _CTX_BY
    if w in ("with", "to"):
        return len(words) > 1 and words[-2] == "spoke"
    return False


_CREDENTIAL = re.compile(
    r",?[ \t]+(?:MD|M\.D\.|DO|RN|NP|PA-C|PA|PhD|MBBS|MRCP|FRCP|FRCS|MBChB|DPM|PharmD|LPN|CNA"
    r"|BSN|MSN|DNP)\b"
)
_STATE_AFTER = re.compile(rf",?[ \t]+(?:{_STATES})\b")


def _names(text: str) -> list[tuple[int, int]]:
    """NAME spans from runs of capitalised tokens: context, titles, Synthea digits, dictionary.

    A run is a sequence of capitalised tokens separated by one space (or ". " after a
    title). Within a run, a name starts after a title ("Dr", "Mrs") or where the text
    before the run ends with a name context ("seen by", "Patient:", "Dear", ...), ends
    before credentials ("MD", "RN"), or contains a known first name or surname.
    """
    out: list[tuple[int, int]] = []
    run: list[tuple[int, int, str]] = []

    def kind(w: str) -> int:
        # 0 stop, 1 ambiguous/initial/unknown-ish, 2 strong, 3 synthea digits, -1 unknown
        if w[-1].isdigit():
            return 3
        if len(w) == 2 and w[1] == ".":
            return 1
        if w in _NAME_SET:
            return 1 if w in _AMBIGUOUS else 2
        if w in _STOP:
            return 0
        return -1

    def take(i: int, kinds: list[int], limit: int = 4) -> None:
        j = i
        while j < len(run) and j - i < limit and kinds[j] != 0 and run[j][2] not in _TITLES:
            j += 1
        while j > i and kinds[j - 1] == 1 and run[j - 1][2].endswith("."):
            j -= 1  # no trailing initial
        if j > i:
            out.append((run[i][0], run[j - 1][1]))

    def flush() -> None:
        if not run:
            return
        kinds = [kind(w) for _, _, w in run]
        if not any(kinds):  # only stop words ("The", "Patient"): nothing here is a name
            run.clear()
            return
        n = len(run)
        s0 = run[0][0]
        if _name_context(text, s0):
            take(0, kinds)
        for i in range(1, n):
            if run[i - 1][2] in _TITLES or (kinds[i - 1] == 0 and _name_context(text, run[i][0])):
                take(i, kinds)
        if _CREDENTIAL.match(text, run[-1][1]):
            i = n - 1
            while i > 0 and n - i < 4 and kinds[i - 1] != 0 and run[i - 1][2] not in _TITLES:
                i -= 1
            if kinds[i] != 0:
                take(i, kinds)
        i = 0
        while i < n:
            k = kinds[i]
            if k == 3:
                j = i
                while j + 1 < n and kinds[j + 1] == 3:
                    j += 1
                out.append((run[i][0], run[j][1]))
                i = j + 1
                continue
            if k not in (1, 2):
                i += 1
                continue
            a = i
            # an unknown word right before a strong surname is taken as its first name
            if a > 0 and kinds[a - 1] == -1 and k == 2 and run[a][2] in _LAST_SET:
                a -= 1
            j = i
            while j + 1 < n and kinds[j + 1] in (1, 2):
                j += 1
            strong = any(kinds[x] == 2 for x in range(i, j + 1))
            if j + 1 < n and kinds[j + 1] == -1 and kinds[j] == 2 and run[j][2] in _FIRST_SET:
                j += 1  # an unknown word right after a strong first name: its surname
            while a <= j and run[a][2].endswith("."):
                a += 1
            b = j
            while b >= a and run[b][2].endswith("."):
                b -= 1
            if (
                a <= b
                and strong
                and not (
                    a == b and _STATE_AFTER.match(text, run[b][1])  # a town: "Austin, TX"
                )
            ):
                out.append((run[a][0], run[b][1]))
            elif a < b:
                out.append((run[a][0], run[b][1]))  # two ambiguous tokens: "Rose Hill"?
            i = j + 1
        run.clear()

    prev_end = -1
    prev_word = ""
    for m in _CAP_TOKEN.finditer(text):
        s, e = m.span()
        if s > 0 and (text[s - 1].isalnum() or text[s - 1] in "'-"):
            continue
        if run:
            gap = text[prev_end:s]
            if not (gap in (" ", "\t") or (gap == ". " and prev_word in _TITLES)):
                flush()
        run.append((s, e, m.group()))
        prev_end, prev_word = e, m.group()
    flush()
    return out


# Anchored detectors: found from a cheap literal ("@", ".com", "::"), then grown both ways.
_EMAIL_LEFT = re.compile(r"[\w.+-]+$")
_EMAIL_RIGHT = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_TLD = re.compile(r"\.(?:com|org|net|edu|gov|io|info|uk)\b")
_DOMAIN_LEFT = re.compile(r"[a-z0-9][a-z0-9.-]*$")
_DOMAIN_RIGHT = re.compile(
    r"(?:\.(?:co\.uk|org\.uk|nhs\.uk|ac\.uk|gov\.uk|com|org|net|edu|gov|io|info))\b"
    r"(?:/[^\s<>\"'()]*[^\s<>\"'().,;:!?])?"
)
_HEX_LEFT = re.compile(r"[0-9A-Fa-f:]*$")
_HEX_RIGHT = re.compile(r"[0-9A-Fa-f:]*")
_IPV6_FULL = re.compile(r"(?<![\w:])[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){7}(?![\w:])")


def _anchored_candidates(text: str) -> list[tuple[int, int, str, int]]:
    """E-mails (around "@"), bare domains (around ".com", ".org", ...) and IPv6 ("::")."""
    out: list[tuple[int, int, str, int]] = []
    i = text.find("@")
    while i >= 0:
        left = _EMAIL_LEFT.search(text, max(0, i - 64), i)
        right = _EMAIL_RIGHT.match(text, i + 1)
        if left and right:
            a = left.start()
            while a < i and text[a] in ".-":
                a += 1
            if a < i:
                out.append((a, right.end(), "EMAIL", 10))
        i = text.find("@", i + 1)
    for m in _TLD.finditer(text):
        left = _DOMAIN_LEFT.search(text, max(0, m.start() - 64), m.start())
        if left is None:
            continue
        a = left.start()
        if a > 0 and (text[a - 1].isalnum() or text[a - 1] in "@/_.:"):
            continue  # part of an e-mail or of a URL with a scheme, found elsewhere
        right = _DOMAIN_RIGHT.match(text, m.start())
        if right and "." in text[a : m.start()] + ".":
            out.append((a, right.end(), "URL", 12))
    i = text.find("::")
    while i >= 0:
        left = _HEX_LEFT.search(text, max(0, i - 40), i)
        a = left.start() if left else i
        right = _HEX_RIGHT.match(text, i)
        b = right.end() if right else i + 2
        if not (a > 0 and (text[a - 1].isalnum() or text[a - 1] == "_")):
            v = text[a:b]
            if len(v) >= 6 and any(c.isdigit() for c in v):
                try:
                    ipaddress.IPv6Address(v)
                    out.append((a, b, "IP", 12))
                except ValueError:
                    pass
        i = text.find("::", max(b, i + 2))
    if text.count(":") >= 7:
        out.extend((m.start(), m.end(), "IP", 12) for m in _IPV6_FULL.finditer(text))
    return out


def _builtin_candidates(text: str) -> list[tuple[int, int, str, int]]:
    cands: list[tuple[int, int, str, int]] = []
    low = text.lower()
    for det in _DETECTORS:
        if det.gate and not any(g in low for g in det.gate):
            continue
        for m in det.regex.finditer(text):
            typ = det.type
            if det.check is not None:
                checked = det.check(m, text)
                if checked is None:
                    continue
                typ = checked
            group: int | str = det.group
            if isinstance(group, str) and m.group(group) is None:
                alt = group + "2"
                group = alt if alt in det.regex.groupindex else 0
            elif group == 0 and "v" in det.regex.groupindex:
                group = "v" if m.group("v") is not None else "v2"
            if det.type == "AGE":
                val = m.group(group)
                if not val or not 89 < int(val) <= 125:
                    continue
            s, e = m.span(group)
            if s < 0 or e <= s:
                continue
            cands.append((s, e, typ, det.priority))
    cands.extend(_anchored_candidates(text))
    for s, e in _names(text):
        cands.append((s, e, "NAME", 16))
    return cands


def _merge_same_type(cands: list[tuple[int, int, str, int]]) -> list[tuple[int, int, str, int]]:
    """Union overlapping NAME candidates, so context and dictionary hits combine."""
    names = sorted(c for c in cands if c[2] == "NAME")
    rest = [c for c in cands if c[2] != "NAME"]
    merged: list[tuple[int, int, str, int]] = []
    for s, e, t, p in names:
        if merged and s < merged[-1][1]:
            ps, pe, pt, pp = merged[-1]
            merged[-1] = (ps, max(pe, e), pt, min(pp, p))
        else:
            merged.append((s, e, t, p))
    return rest + merged


def _resolve(cands: list[tuple[int, int, str, int]]) -> list[Span]:
    """Keep the longest spans (ties: lower priority), dropping any overlapping a kept one."""
    cands = _merge_same_type(cands)
    cands.sort(key=lambda c: (-(c[1] - c[0]), c[3], c[0]))
    starts: list[int] = []
    ends: list[int] = []
    kept: list[Span] = []
    for s, e, t, _ in cands:
        i = bisect.bisect_left(starts, s)
        if i > 0 and ends[i - 1] > s:
            continue
        if i < len(starts) and starts[i] < e:
            continue
        starts.insert(i, s)
        ends.insert(i, e)
        kept.insert(i, Span(s, e, t))
    return kept


# --------------------------------------------------------------------------- presidio

_PRESIDIO_MAP = {
    "PERSON": "NAME",
    "DATE_TIME": "DATE",
    "PHONE_NUMBER": "PHONE",
    "EMAIL_ADDRESS": "EMAIL",
    "US_SSN": "SSN",
    "URL": "URL",
    "IP_ADDRESS": "IP",
    "US_DRIVER_LICENSE": "LICENSE",
    "US_PASSPORT": "LICENSE",
    "MEDICAL_LICENSE": "LICENSE",
    "UK_NHS": "MRN",
    "US_BANK_NUMBER": "ACCOUNT",
    "CREDIT_CARD": "ACCOUNT",
    "IBAN_CODE": "ACCOUNT",
    "US_ITIN": "SSN",
    "LOCATION": "ADDRESS",
}
_PRESIDIO_HINT = (
    "backend 'presidio' needs Microsoft Presidio, which is not installed. Fix: "
    "`pip install presidio-analyzer` and a spaCy model (`python -m spacy download "
    "en_core_web_lg`), or use the built-in backend (--backend builtin)"
)


def _load_presidio() -> Any:
    try:
        from presidio_analyzer import AnalyzerEngine
    except ImportError as e:
        raise PresidioUnavailableError(_PRESIDIO_HINT) from e
    try:
        return AnalyzerEngine()
    except Exception as e:  # spaCy model missing, typically
        raise PresidioUnavailableError(f"{_PRESIDIO_HINT}. Presidio said: {e}") from e


# --------------------------------------------------------------------------- scrubber


def _normalise(typ: str, value: str) -> str:
    if typ in ("NAME", "ADDRESS", "DATE", "EMAIL", "URL"):
        return " ".join(value.split()).casefold()
    return "".join(c for c in value if c.isalnum()).upper()


class Scrubber:
    """Detect identifiers in free text and replace them by placeholders or pseudonyms.

    ``names`` adds site-specific names (e.g. the site's staff and patient list) to the
    dictionary; they are matched case-sensitively as whole words wherever they occur.
    """

    def __init__(
        self,
        *,
        mode: Mode = "placeholder",
        secret: bytes | None = None,
        names: Iterable[str] = (),
        backend: Backend = "builtin",
    ) -> None:
        if mode not in ("placeholder", "pseudonym"):
            raise DeidError(f"mode: unknown mode {mode!r}. Fix: use 'placeholder' or 'pseudonym'")
        if backend not in ("builtin", "presidio"):
            raise DeidError(f"backend: unknown backend {backend!r}. Fix: 'builtin' or 'presidio'")
        if mode == "pseudonym":
            if not secret:
                raise DeidError(
                    "mode 'pseudonym' needs a secret key (bytes) so pseudonyms cannot be "
                    "recomputed by others. Fix: pass secret=... (CLI: --secret-file FILE with "
                    "at least 16 random bytes, e.g. `head -c 32 /dev/urandom > key`)"
                )
            if not isinstance(secret, bytes | bytearray):
                raise DeidError("secret: must be bytes. Fix: pass secret=b'...' or key.encode()")
        self.mode: Mode = mode
        self.backend: Backend = backend
        self._secret = bytes(secret) if secret else b""
        self._cache: dict[tuple[str, str], str] = {}
        extra = sorted({n.strip() for n in names if n and n.strip()}, key=len, reverse=True)
        self._names_re = (
            re.compile(r"(?<!\w)(?:" + "|".join(re.escape(n) for n in extra) + r")(?!\w)")
            if extra
            else None
        )
        self._presidio = _load_presidio() if backend == "presidio" else None

    # -- detection
    def detect(self, text: str) -> list[Span]:
        """The identifiers found in ``text``: sorted, disjoint spans over it."""
        if not isinstance(text, str):
            raise DeidError(f"text: expected a string, got {type(text).__name__}")
        cands = _builtin_candidates(text)
        if self._names_re is not None:
            cands.extend((m.start(), m.end(), "NAME", 3) for m in self._names_re.finditer(text))
        if self._presidio is not None:
            if self.backend == "presidio":
                keep = {"AGE", "MRN", "ZIP", "FAX", "ACCOUNT", "LICENSE"}
                cands = [c for c in cands if c[2] in keep]
            for r in self._presidio.analyze(text=text, language="en"):
                typ = _PRESIDIO_MAP.get(r.entity_type)
                if typ is not None and r.end > r.start:
                    cands.append((int(r.start), int(r.end), typ, 2))
        return _resolve(cands)

    # -- replacement
    def replacement(self, typ: str, value: str) -> str:
        if self.mode == "placeholder":
            return PLACEHOLDERS[typ]
        key = (typ, _normalise(typ, value))
        hit = self._cache.get(key)
        if hit is None:
            msg = key[0].encode() + b"\x00" + key[1].encode()
            hit = f"{typ}-{hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:8]}"
            if len(self._cache) < 100_000:
                self._cache[key] = hit
        return hit

    def scrub(self, text: str) -> ScrubResult:
        spans = self.detect(text)
        parts: list[str] = []
        pos = 0
        for sp in spans:
            parts.append(text[pos : sp.start])
            parts.append(self.replacement(sp.type, text[sp.start : sp.end]))
            pos = sp.end
        parts.append(text[pos:])
        return ScrubResult("".join(parts), spans)


def scrub(text: str, **kw: Any) -> ScrubResult:
    """One-off convenience: ``Scrubber(**kw).scrub(text)``."""
    return Scrubber(**kw).scrub(text)
