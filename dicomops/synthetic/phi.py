"""Realistic fake protected health information, so de-identification has something real to remove.

Every value is drawn from a seeded generator; none belongs to a real person.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

import numpy as np

_LAST = (
    "HARTMANN", "OKAFOR", "LINDQVIST", "MORETTI", "GALLAGHER", "NAKAMURA", "FERREIRA", "KOWALSKI",
    "ABERNATHY", "DUBOIS", "CASTELLANOS", "WHITFIELD", "PETRENKO", "ANDERSSON", "MCALLISTER",
    "BRENNAN", "SCHNEIDER", "VASQUEZ", "HOLLOWAY", "RAGHAVAN", "OSTROWSKI", "FITZGERALD",
    "DELACROIX", "THORNBURY", "KAWASAKI", "MONTGOMERY", "SANTORO", "BJORKLUND", "ACHTERBERG",
    "QUINTERO", "WESTBROOK", "ZIMMERMANN", "ONYEKACHI", "LAURENTIS", "HAVERFORD", "PEMBERTON",
)
_FIRST = (
    "ELISE", "MARCUS", "INGRID", "TOBIAS", "BEATRIX", "CORNELIUS", "DELPHINE", "AUGUSTIN",
    "ROSALIND", "FREDERICK", "MAGNOLIA", "LEOPOLD", "HENRIETTA", "BARTHOLOMEW", "ESTELLE",
    "GIDEON", "PRISCILLA", "LYSANDER", "OTTILIE", "EMERSON", "CLEMENTINE", "THADDEUS", "WINIFRED",
    "EZEKIEL", "ANASTASIA", "BENEDICT", "MARGUERITE", "SEBASTIAN", "PHILIPPA", "CASIMIR",
)
_STREETS = ("Juniper Lane", "Harbor View Road", "Maple Crescent", "Old Mill Street", "Kestrel Way",
            "Foxglove Avenue", "Larkspur Court", "Quarry Hill Drive")
_TOWNS = ("Millbrook", "Ashford Falls", "Port Elgin", "Cedar Hollow", "Wrenfield", "Stonebridge")
_HOSPITALS = (("Saint Aldric General Hospital", "41 Cathedral Row, Millbrook"),
              ("Wrenfield University Medical Centre", "1200 College Parade, Wrenfield"),
              ("Harborside Community Hospital", "7 Quayside Terrace, Port Elgin"))


@dataclass(frozen=True)
class PatientPHI:
    """The identifying values of one synthetic patient and study."""

    patient_name: str
    patient_id: str
    other_patient_id: str
    issuer_of_patient_id: str
    birth_date: str
    sex: str
    age: str
    size_m: float
    weight_kg: float
    address: str
    telephone: str
    accession_number: str
    study_id: str
    requested_procedure_id: str
    scheduled_step_id: str
    referring_physician: str
    performing_physician: str
    operator: str
    institution: str
    institution_address: str
    comments: str
    study_date: str
    study_time: str

    def needles(self) -> dict[str, str]:
        """Values that must never appear past the ingest gate, by field name.

        Patient characteristics that the de-identification profile retains on purpose (sex, age,
        size, weight) are not needles.
        """
        keep = {"sex", "age", "size_m", "weight_kg", "study_time"}
        values = {k: str(v) for k, v in asdict(self).items() if k not in keep}
        last, first = self.patient_name.split("^")[:2]
        values["patient_name_text"] = f"{first.title()} {last.title()}"
        return values


def _name(rng: np.random.Generator) -> str:
    return f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[int(rng.integers(len(_FIRST)))]}"


def sample_phi(rng: np.random.Generator, index: int, first_year: int) -> PatientPHI:
    """Draw the PHI of patient number `index`; study dates start in `first_year`."""
    name = _name(rng)
    last, first = name.split("^")
    study = dt.date(first_year, 1, 1) + dt.timedelta(days=int(rng.integers(0, 700)))
    age_years = int(rng.integers(35, 88))
    birth = study - dt.timedelta(days=int(age_years * 365.25 + rng.integers(0, 360)))
    sex = "F" if rng.random() < 0.5 else "M"
    hospital, hospital_address = _HOSPITALS[int(rng.integers(len(_HOSPITALS)))]
    mrn = f"MRN{int(rng.integers(10**6, 10**7)):07d}{index % 10}"
    accession = f"ACC{study:%y}{int(rng.integers(10**7, 10**8))}"
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    return PatientPHI(
        patient_name=name,
        patient_id=mrn,
        other_patient_id=f"HX{int(rng.integers(10**8, 10**9))}",
        issuer_of_patient_id=f"{hospital.split()[0].upper()}-MPI",
        birth_date=f"{birth:%Y%m%d}",
        sex=sex,
        age=f"{age_years:03d}Y",
        size_m=round(float(rng.uniform(1.52, 1.95)), 2),
        weight_kg=round(float(rng.uniform(48, 125)), 1),
        address=(f"{int(rng.integers(2, 980))} {_STREETS[int(rng.integers(len(_STREETS)))]}, "
                 f"{_TOWNS[int(rng.integers(len(_TOWNS)))]}"),
        telephone=f"+1-555-{int(rng.integers(200, 999))}-{int(rng.integers(1000, 9999))}",
        accession_number=accession,
        study_id=f"S{int(rng.integers(10**5, 10**6))}",
        requested_procedure_id=f"RP{int(rng.integers(10**6, 10**7))}",
        scheduled_step_id=f"SPS{int(rng.integers(10**6, 10**7))}",
        referring_physician=f"{_name(rng)}^^DR",
        performing_physician=f"{_name(rng)}",
        operator=f"{_name(rng)}",
        institution=hospital,
        institution_address=hospital_address,
        comments=f"Follow-up chest CT for {first.title()} {last.title()} ({mrn}), smoker, see prior",
        study_date=f"{study:%Y%m%d}",
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
    )
