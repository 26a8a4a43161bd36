"""Seeded generator of synthetic clinical notes with labelled identifier spans.

Used by the tests and by ``benchmarks/deid.py`` to measure the free-text scrubber. The
templates, name lists and value formats here are written independently of the scrubber's
patterns (``text.py``): many names are not in its dictionaries, formats vary, and every
note carries hard negatives (doses, lab values, fractions, times, ages <= 89, words such
as "May", "Will" or "Bill" used as ordinary words) that must *not* be flagged.

Each :class:`Note` has exact gold spans: ``note.text[s.start:s.end]`` is the identifier.
Conventions: a title ("Dr.", "Mrs") is not part of a NAME span; an AGE span is the number
only ("92" in "92-year-old") and only ages over 89 are labelled; a street address span
covers the house number, street and unit, while town and ZIP/postcode are separate (the
postcode is ZIP).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from confide.privacy.deid.text import Span

__all__ = ["Note", "generate_notes"]


@dataclass
class Note:
    id: str
    text: str
    spans: list[Span] = field(default_factory=list)


# Names: a mix of very common ones and rarer ones (not in any built-in dictionary).
_FIRST = [
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Susan",
    "Richard",
    "Margaret",
    "Thomas",
    "Dorothy",
    "Charles",
    "Helen",
    "George",
    "Joan",
    "Edward",
    "Eleanor",
    "Harold",
    "Mildred",
    "Ottilie",
    "Bartholomew",
    "Saoirse",
    "Nkechi",
    "Ignatius",
    "Wilhelmina",
    "Thaddeus",
    "Philippa",
    "Cosmo",
    "Leopold",
    "Agnieszka",
    "Tobias",
    "Perpetua",
    "Dashiell",
    "Rosalind",
    "Evander",
    "Clementine",
    "Oisin",
    "Niamh",
    "Siobhan",
    "Tamsin",
    "Jolene",
    "Horatio",
    "Marisol",
    "Esperanza",
    "Ximena",
    "Anselm",
    "Bronwen",
    "Cerys",
    "Gwilym",
    "Aurelio",
    "Yusuf",
    "Amara",
    "Chidi",
    "Kwame",
    "Ngozi",
    "Ravi",
    "Deepika",
    "Haruto",
    "Mei",
    "Xiaoling",
    "Dmitri",
    "Svetlana",
    "Bogdan",
]
_LAST = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Miller",
    "Davis",
    "Wilson",
    "Taylor",
    "Anderson",
    "Thomas",
    "Moore",
    "Clark",
    "Lewis",
    "Walker",
    "Hall",
    "Young",
    "King",
    "Wright",
    "Scott",
    "Green",
    "Baker",
    "Adams",
    "Nelson",
    "Carter",
    "Thistlewood",
    "Abernathy",
    "Wojcik",
    "Okonjo",
    "Featherstonehaugh",
    "Pemberton",
    "Quigley",
    "Rutherford",
    "Vandermeer",
    "Castellanos",
    "Oyelaran",
    "Lindgren",
    "Haverford",
    "Blackwood",
    "Montgomery",
    "Ashcombe",
    "Fairweather",
    "Kowalczyk",
    "Nakashima",
    "Szabo",
    "Ferreira",
    "Delacroix",
    "Oduya",
    "Trelawney",
    "Pennington",
    "Holloway",
    "Whitcombe",
    "Bramwell",
    "Achterberg",
    "Esterhuizen",
    "Mbeki",
    "Grzybowski",
    "Sorensen",
    "Dunleavy",
    "O'Hare",
    "McAllister",
    "Fitzwilliam",
    "Ramaswamy",
    "Tanaka",
    "Petrov",
    "Jankowski",
]
_SYNTHEA_FIRST = [
    "Marcell",
    "Jacinto",
    "Lavonne",
    "Shirleen",
    "Delmer",
    "Kristofer",
    "Eugenio",
    "Rosalia",
    "Teodoro",
]
_SYNTHEA_LAST = [
    "VonRueden",
    "Schowalter",
    "Kshlerin",
    "Wunsch",
    "Bogisich",
    "Hettinger",
    "Ankunding",
    "Runolfsdottir",
]

_STREETS = [
    "Heathcote",
    "Maple",
    "Oak",
    "Elm",
    "Cedar",
    "Willow",
    "Station",
    "Church",
    "Mill",
    "Victoria",
    "Albert",
    "Kingsway",
    "Larkspur",
    "Bramble",
    "Foxglove",
    "Harbour",
    "Orchard",
    "Meadowbank",
    "Ashgrove",
    "Beechwood",
    "Chestnut",
    "Riverside",
    "Hawthorn",
    "Juniper",
    "Pinecrest",
    "Lakeview",
    "Sunnyside",
    "Briarwood",
    "Crescent",
    "Moorland",
]
_STREET_TYPES = [
    "Street",
    "St",
    "St.",
    "Avenue",
    "Ave",
    "Road",
    "Rd",
    "Lane",
    "Ln",
    "Drive",
    "Dr",
    "Court",
    "Way",
    "Close",
    "Crescent",
    "Terrace",
    "Boulevard",
    "Blvd",
    "Place",
    "Well",
    "Mews",
    "Grove",
    "Gardens",
    "Parkway",
]
_TOWNS_US = [
    ("Boston", "MA"),
    ("Springfield", "IL"),
    ("Austin", "TX"),
    ("Portland", "OR"),
    ("Madison", "WI"),
    ("Columbus", "OH"),
    ("Denver", "CO"),
    ("Raleigh", "NC"),
]
_TOWNS_UK = [
    ("Lancaster", "LA"),
    ("Grays", "RM"),
    ("Leeds", "LS"),
    ("Bristol", "BS"),
    ("Norwich", "NR"),
    ("Cardiff", "CF"),
    ("York", "YO"),
    ("Exeter", "EX"),
]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
_DOMAINS = ["example.com", "mail.example.org", "hospital.example.net", "clinic.example.co.uk"]
_DRUGS = [
    "metformin 500 mg twice daily",
    "lisinopril 10 mg once daily",
    "atorvastatin 40 mg at night",
    "amoxicillin 500 mg three times a day",
    "furosemide 40 mg in the morning",
    "apixaban 5 mg bd",
    "paracetamol 1 g qds prn",
    "insulin glargine 18 units at 22:00",
]
_NEGATIVES = [
    "Hb 13.2 g/dL, WCC 7.4, platelets 245.",
    "BP 132/84, HR 78, SpO2 97% on room air, T 37.1.",
    "Use 3/4 strength feeds for 2 days, then full strength.",
    "Next dose at 10:30 and 18:00.",
    "May continue current dose if tolerated.",
    "Will review in clinic in 6 weeks.",
    "Bill for the scan was sent to the insurer.",
    "HbA1c 7.1% (54 mmol/mol), eGFR 68.",
    "Take 1/2 tablet if dizzy; max 2-3 times per day.",
    "Grade 2 pressure ulcer, 3 x 4 cm, on the left heel.",
    "Pain score 4/10, improved from 7/10.",
    "CD4 count 350, viral load undetectable.",
    "Troponin 0.02 at 0 and 3 hours.",
    "Room 12, bed 4 on Ward 7.",
    "Walked 200 m with a frame; Barthel 15/20.",
    "ICD-10 E11.9; smoking 20 pack-years.",
    "Mark the wound edges at each dressing change.",
    "Grace period for the repeat prescription is 7 days.",
    "Her mood was in good spirits; hope to discharge soon.",
]


class _Builder:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n = 0
        self.spans: list[Span] = []

    def add(self, s: str) -> _Builder:
        self.parts.append(s)
        self.n += len(s)
        return self

    def pii(self, typ: str, value: str) -> _Builder:
        self.spans.append(Span(self.n, self.n + len(value), typ))
        return self.add(value)

    def text(self) -> str:
        return "".join(self.parts)


class _Gen:
    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    # ---- values
    def first(self) -> str:
        return self.r.choice(_FIRST)

    def last(self) -> str:
        return self.r.choice(_LAST)

    def full_name(self) -> str:
        r = self.r
        k = r.random()
        if k < 0.12:
            first = f"{r.choice(_SYNTHEA_FIRST)}{r.randint(10, 999)}"
            return f"{first} {r.choice(_SYNTHEA_LAST)}{r.randint(10, 999)}"
        if k < 0.22:
            return f"{self.first()[0]}. {self.last()}"
        if k < 0.3:
            return f"{self.first()} {self.first()[0]}. {self.last()}"
        return f"{self.first()} {self.last()}"

    def title(self, b: _Builder, who: str = "any") -> None:
        """A titled name: the title is plain text, the name is the span."""
        r = self.r
        t = (
            r.choice(["Dr.", "Dr"])
            if who == "doctor"
            else r.choice(["Mr.", "Mrs", "Ms.", "Miss", "Mr"])
        )
        b.add(t + " ")
        b.pii("NAME", self.last() if r.random() < 0.5 else self.full_name())

    def date(self) -> str:
        r = self.r
        y, m, d = r.randint(1925, 2024), r.randint(1, 12), r.randint(1, 28)
        mon = _MONTHS[m - 1]
        sfx = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}.get(d, "th")
        fmts = [
            f"{y:04d}-{m:02d}-{d:02d}",
            f"{m:02d}/{d:02d}/{y}",
            f"{m}/{d}/{y % 100:02d}",
            f"{d}/{m}/{y}",
            f"{d:02d}.{m:02d}.{y}",
            f"{mon} {d}, {y}",
            f"{d} {mon} {y}",
            f"{mon[:3]} {d}{sfx}",
            f"{mon[:3]}. {d}, {y}",
            f"{d}{sfx} {mon}",
            f"{mon} {y}",
            f"{d}-{mon[:3]}-{y}",
        ]
        return r.choice(fmts)

    def phone(self) -> str:
        r = self.r
        a, b, c = r.randint(201, 989), r.randint(200, 999), r.randint(0, 9999)
        fmts = [
            f"({a}) {b}-{c:04d}",
            f"{a}-{b}-{c:04d}",
            f"{a}.{b}.{c:04d}",
            f"+1 {a} {b} {c:04d}",
            f"{a}-{b}-{c:04d} ext. {r.randint(10, 9999)}",
            f"+44 20 {r.randint(7000, 8999)} {c:04d}",
            f"+44 7700 {r.randint(100000, 999999)}",
            f"01{r.randint(100, 999)} {r.randint(100000, 999999)}",
            f"1-{a}-{b}-{c:04d}",
        ]
        return r.choice(fmts)

    def email(self) -> str:
        r = self.r
        f, last = self.first().lower(), self.last().lower().replace("'", "")
        user = r.choice([f"{f}.{last}", f"{f[0]}{last}{r.randint(1, 99)}", f"{last}_{f}"])
        return f"{user}@{r.choice(_DOMAINS)}"

    def url(self) -> str:
        r = self.r
        return r.choice(
            [
                f"https://portal.{r.choice(_DOMAINS)}/patients/{r.randint(1000, 99999)}",
                f"http://www.{r.choice(['stmarys', 'northgate', 'riverside'])}-health.org/clinic",
                f"www.{r.choice(['kidneycare', 'heartfit', 'carers'])}.org.uk/help",
                f"https://myhealth.{r.choice(_DOMAINS)}/login?user={r.randint(100, 999)}",
            ]
        )

    def ip(self) -> str:
        r = self.r
        if r.random() < 0.25:
            return f"2001:db8:{r.randint(1, 0xFFFF):x}::{r.randint(1, 0xFFFF):x}"
        a = r.choice([10, 172, 192, 81, 145])
        return f"{a}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"

    def ssn(self) -> str:
        r = self.r
        a, b, c = r.randint(100, 665), r.randint(10, 99), r.randint(1000, 9999)
        return f"{a}-{b}-{c}" if r.random() < 0.7 else f"{a}{b}{c}"

    def mrn(self) -> str:
        r = self.r
        return r.choice(
            [
                str(r.randint(1_000_000, 99_999_999)),
                f"MR{r.randint(100000, 999999)}",
                f"{r.randint(100, 999)} {r.randint(100, 999)} {r.randint(1000, 9999)}",
                f"H-{r.randint(10000, 999999)}",
            ]
        )

    def account(self) -> str:
        r = self.r
        return r.choice(
            [
                str(r.randint(10_000_000, 9_999_999_999)),
                f"{r.randint(1000, 9999)}-{r.randint(100000, 999999)}",
                f"XK{r.randint(1000000, 9999999)}",
                f"BCBS{r.randint(10000000, 99999999)}",
                f"{r.choice('ABCDEFGHJK')}{r.randint(100, 999)}-{r.randint(10000, 99999)}",
            ]
        )

    def licence(self) -> str:
        r = self.r
        return r.choice(
            [
                f"S999{r.randint(10000, 99999)}",
                f"{r.choice('ABDGKMPT')}{r.randint(1000000, 9999999)}",
                f"{r.choice(['SMITH', 'JONES', 'WOJCI'])}{r.randint(100000, 999999)}AB9CD",
                f"{r.randint(100, 999)}-{r.randint(100, 999)}-{r.randint(100, 999)}",
            ]
        )

    def street(self) -> str:
        r = self.r
        s = f"{r.randint(1, 9999)} {r.choice(_STREETS)} {r.choice(_STREET_TYPES)}"
        if r.random() < 0.35:
            s += r.choice(
                [
                    f" Unit {r.randint(1, 99)}",
                    f", Apt {r.randint(1, 40)}{r.choice('ABC')}",
                    f" Suite {r.randint(100, 999)}",
                    f", Flat {r.randint(1, 30)}",
                ]
            )
        return s

    def address(self, b: _Builder) -> None:
        """A street line, town and ZIP or postcode (spans: ADDRESS and ZIP)."""
        r = self.r
        b.pii("ADDRESS", self.street())
        if r.random() < 0.5:
            town, st = r.choice(_TOWNS_US)
            z = f"{r.randint(10000, 99999)}"
            if r.random() < 0.25:
                z += f"-{r.randint(1000, 9999)}"
            b.add(f", {town}, {st} ").pii("ZIP", z)
        else:
            town, area = r.choice(_TOWNS_UK)
            inward = "".join(r.choice("ABDEFGHJLNPQRSTUWXYZ") for _ in range(2))
            pc = f"{area}{r.randint(1, 20)} {r.randint(1, 9)}{inward}"
            if r.random() < 0.2:
                b.add(f", {town}, ").pii("ZIP", f"{area}{r.randint(1, 20)}")
            else:
                b.add(f", {town} ").pii("ZIP", pc)

    def age(self, b: _Builder) -> None:
        r = self.r
        a = r.randint(90, 104) if r.random() < 0.5 else r.randint(18, 89)
        form = r.randrange(4)
        lab = "AGE" if a > 89 else None

        def val() -> None:
            if lab:
                b.pii(lab, str(a))
            else:
                b.add(str(a))

        if form == 0:
            b.add("a ")
            val()
            b.add("-year-old ")
        elif form == 1:
            b.add("aged ")
            val()
            b.add(", ")
        elif form == 2:
            b.add("(age: ")
            val()
            b.add(") ")
        else:
            val()
            b.add(" y/o ")

    def negative(self) -> str:
        return self.r.choice(_NEGATIVES)


# --------------------------------------------------------------------------- templates


def _admission(g: _Gen, b: _Builder) -> None:
    r = g.r
    b.add("ADMISSION NOTE\nPatient: ").pii("NAME", g.full_name()).add("\nDOB: ").pii(
        "DATE", g.date()
    )
    b.add("   MRN: ").pii("MRN", g.mrn()).add("\nAdmitted: ").pii("DATE", g.date()).add("\n\n")
    b.add("HPI: ")
    g.title(b)
    b.add(" is ")
    g.age(b)
    b.add(r.choice(["man", "woman", "patient"]) + " admitted with shortness of breath. ")
    b.add(g.negative() + " ")
    b.add("Lives at ")
    g.address(b)
    b.add(" with ")
    b.add(r.choice(["his wife ", "her husband ", "daughter "])).pii("NAME", g.first())
    b.add(". Home phone ").pii("PHONE", g.phone()).add(".\n")
    b.add("Medications: " + r.choice(_DRUGS) + "; " + r.choice(_DRUGS) + ".\n")
    b.add("Insurance: Medicare ID ").pii("ACCOUNT", g.account()).add(". ")
    b.add("SSN ").pii("SSN", g.ssn()).add(".\n")
    b.add(g.negative() + "\nPlan: admit under ")
    g.title(b, "doctor")
    b.add(", repeat bloods on ").pii("DATE", g.date()).add(". " + g.negative() + "\n")
    b.add("Seen by ").pii("NAME", g.full_name()).add(", MD\n")


def _discharge(g: _Gen, b: _Builder) -> None:
    r = g.r
    b.add("DISCHARGE SUMMARY\nName: ").pii("NAME", g.full_name()).add("    Medical record number: ")
    b.pii("MRN", g.mrn()).add("\nAdmission date: ").pii("DATE", g.date())
    b.add("   Discharge date: ").pii("DATE", g.date()).add("\n")
    b.add("Attending: ")
    g.title(b, "doctor")
    b.add("\n\nCourse: The patient, ")
    g.age(b)
    b.add("was treated for pneumonia. " + g.negative() + " " + g.negative() + "\n")
    b.add("Discharge medications: " + r.choice(_DRUGS) + ".\n")
    b.add("Follow-up with ")
    g.title(b, "doctor")
    b.add(" on ").pii("DATE", g.date()).add(". Clinic fax: ").pii("FAX", g.phone()).add(".\n")
    b.add("Driver's license ").pii("LICENSE", g.licence()).add(" noted for DVLA advice.\n")
    b.add("Patient portal: ").pii("URL", g.url()).add(" (last login from ").pii("IP", g.ip()).add(
        ").\n"
    )
    b.add("Discharge address: ")
    g.address(b)
    b.add(".\n" + g.negative() + "\nElectronically signed by ").pii("NAME", g.full_name()).add(
        " on "
    ).pii("DATE", g.date()).add("\n")


def _referral(g: _Gen, b: _Builder) -> None:
    r = g.r
    b.pii("ADDRESS", g.street()).add("\n")
    town, st = r.choice(_TOWNS_US)
    b.add(f"{town}, {st} ").pii("ZIP", f"{r.randint(10000, 99999)}").add("\n")
    b.add("Tel: ").pii("PHONE", g.phone()).add("  Fax: ").pii("FAX", g.phone()).add("\n")
    b.pii("DATE", g.date()).add("\n\nDear ")
    g.title(b, "doctor")
    b.add(",\n\nRe: ").pii("NAME", g.full_name()).add(", DOB ").pii("DATE", g.date())
    b.add(", NHS number ").pii(
        "MRN", f"{r.randint(100, 999)} {r.randint(100, 999)} {r.randint(1000, 9999)}"
    )
    b.add("\n\nThank you for seeing this ")
    g.age(b)
    b.add("gentleman with worsening angina. " + g.negative() + " " + g.negative() + "\n")
    b.add("He can be reached at ").pii("EMAIL", g.email()).add(" or on ").pii("PHONE", g.phone())
    b.add(". His policy number is ").pii("ACCOUNT", g.account()).add(".\n")
    b.add("Current medication: " + r.choice(_DRUGS) + ".\n\nYours sincerely,\n\n")
    g.title(b, "doctor")
    b.add("\nGeneral Practitioner\n")


def _phone_message(g: _Gen, b: _Builder) -> None:
    r = g.r
    b.add("TELEPHONE MESSAGE ").pii("DATE", g.date()).add(" at 10:30\n")
    b.add("Caller: ").pii("NAME", g.full_name()).add(" (")
    b.add(r.choice(["daughter", "son", "carer", "neighbour"])).add(") on ").pii("PHONE", g.phone())
    b.add("\nRe: ")
    g.title(b)
    b.add(", MRN ").pii("MRN", g.mrn()).add("\n")
    b.add("Message: mother is ")
    g.age(b)
    b.add("and more confused since ").pii("DATE", g.date()).add(". " + g.negative() + "\n")
    b.add("Account #").pii("ACCOUNT", g.account()).add(" queried about the bill. ")
    b.add("Please email ").pii("EMAIL", g.email()).add(" or call back.\n")
    b.add(g.negative() + "\nTaken by ").pii("NAME", g.full_name()).add(", RN\n")


def _triage(g: _Gen, b: _Builder) -> None:
    r = g.r
    b.add("ED TRIAGE ").pii("DATE", g.date()).add("\n")
    b.add("Pt: ").pii("NAME", g.full_name()).add(", ")
    g.age(b)
    b.add("\nSocial security number: ").pii("SSN", g.ssn()).add("\n")
    b.add("DL# ").pii("LICENSE", g.licence()).add("   Plan ID: ").pii("ACCOUNT", g.account()).add(
        "\n"
    )
    b.add("Address: ")
    g.address(b)
    b.add("\nNOK: ").pii("NAME", g.full_name()).add(", ").pii("PHONE", g.phone()).add("\n")
    b.add("Presenting complaint: fall at home. " + g.negative() + " " + g.negative() + "\n")
    b.add("Registered via kiosk ").pii("IP", g.ip()).add("; info leaflet ").pii("URL", g.url()).add(
        ".\n"
    )
    b.add(r.choice(_DRUGS).capitalize() + " held.\n")


_TEMPLATES: tuple[Callable[[_Gen, _Builder], None], ...] = (
    _admission,
    _discharge,
    _referral,
    _phone_message,
    _triage,
)


def generate_notes(n: int, seed: int = 0) -> list[Note]:
    """``n`` synthetic notes (same ``seed`` -> same notes), each with exact gold spans."""
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    rng = random.Random(seed)
    g = _Gen(rng)
    notes: list[Note] = []
    for i in range(n):
        b = _Builder()
        _TEMPLATES[i % len(_TEMPLATES)](g, b)
        notes.append(Note(id=f"note-{seed}-{i:05d}", text=b.text(), spans=b.spans))
    return notes
