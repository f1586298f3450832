"""Built-in datasets: the public medical sets in ``../shared/data`` and a generated sample.

The registry is closed: :func:`load_builtin` accepts only the names in
:data:`BUILTIN_DATASETS`. The medical sets are read from a data folder
(:func:`resolve_data_dir`); ``medical_sample`` is generated in code, deterministically, and
needs no folder, so demos and tests work on a machine without ``../shared``.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shieldtune.data.tables import Dataset, Example, load_table
from shieldtune.errors import DataError
from shieldtune.registry import Registry

__all__ = [
    "BUILTIN_DATASETS",
    "DATA_DIR_ENV",
    "MEDICAL_CONDITIONS",
    "BuiltinInfo",
    "builtin_info",
    "default_data_dirs",
    "generate_medical_sample",
    "load_builtin",
    "resolve_data_dir",
]

DATA_DIR_ENV = "SHIELDTUNE_DATA_DIR"
"""Environment variable naming the folder that holds the medical data files."""

MEDICAL_CONDITIONS = [
    "neoplasms",
    "digestive system diseases",
    "nervous system diseases",
    "cardiovascular diseases",
    "general pathological conditions",
]
"""The five condition classes of medical_abstracts (labels 1..5 in the file, 0..4 here)."""


@dataclass(frozen=True)
class BuiltinInfo:
    """What a built-in dataset is and where it comes from.

    Attributes:
        name: Registry name.
        task: ``single`` (one text) or ``pair`` (two texts).
        files: Files read from the data folder (empty for generated data).
        description: One line on the task.
        source: Citation / origin, to keep with any result built on the data.
        licence: Licence of the data.
    """

    name: str
    task: Literal["single", "pair"]
    files: tuple[str, ...]
    description: str
    source: str
    licence: str

    @property
    def needs_data_dir(self) -> bool:
        """Whether loading reads files from the data folder."""
        return bool(self.files)


@dataclass(frozen=True)
class _Entry:
    info: BuiltinInfo
    load: Callable[[Path | None], Dataset]


_REGISTRY: Registry[_Entry] = Registry("built-in dataset")


def _repo_shared_data() -> Path:
    # src/shieldtune/data/builtin.py -> parents[3] is the repository root.
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def default_data_dirs() -> list[Path]:
    """Return the folders searched, in order, when no data folder is given.

    ``$SHIELDTUNE_DATA_DIR`` if set (and then only it), else ``<repo>/../shared/data`` and
    ``./data``.

    Returns:
        The candidate folders.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return [Path(env).expanduser()]
    return [_repo_shared_data(), Path.cwd() / "data"]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Find the folder holding the medical data files.

    Args:
        data_dir: An explicit folder; None to use ``$SHIELDTUNE_DATA_DIR``, else the first
            existing of ``<repo>/../shared/data`` and ``./data``.

    Returns:
        The folder.

    Raises:
        DataError: The folder does not exist; the message says where it looked and how to
            point at the right one.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataError(
                f"data folder {str(path)!r} does not exist; pass the folder holding the "
                f"medical data files (or set ${DATA_DIR_ENV})"
            )
        return path
    candidates = default_data_dirs()
    for path in candidates:
        if path.is_dir():
            return path
    looked = ", ".join(repr(str(p)) for p in candidates)
    if os.environ.get(DATA_DIR_ENV):
        hint = f"${DATA_DIR_ENV} points at a folder that does not exist; fix or unset it"
    else:
        hint = f"set ${DATA_DIR_ENV} to the folder holding the medical data files, or pass data_dir"
    raise DataError(
        f"no data folder found (looked in {looked}); {hint}. "
        "The 'medical_sample' dataset needs no folder."
    )


def _data_file(data_dir: Path | None, name: str) -> Path:
    folder = resolve_data_dir(data_dir)
    path = folder / name
    if not path.is_file():
        raise DataError(
            f"data file {name!r} not found in data folder {str(folder)!r}; point "
            f"${DATA_DIR_ENV} (or data_dir) at the folder that holds it"
        )
    return path


def _check_rows(ds: Dataset, path: Path, label_set: set[int] | None = None) -> Dataset:
    present = set(ds.labels())
    if label_set is not None and present != label_set:
        raise DataError(
            f"data file {str(path)!r}: expected labels {sorted(label_set)}, found {sorted(present)}"
        )
    return ds


def _load_medical_abstracts(data_dir: Path | None) -> Dataset:
    path = _data_file(data_dir, "medical_abstracts.csv")
    names_path = _data_file(data_dir, "medical_abstracts_labels.csv")
    names: dict[str, str] = {}
    with names_path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"condition_label", "condition_name"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"data file {str(names_path)!r} lacks column(s) {sorted(missing)}; "
                f"available: {reader.fieldnames}"
            )
        for row in reader:
            names[row["condition_label"].strip()] = row["condition_name"].strip()
    codes = sorted(names, key=int)
    ds = load_table(
        path,
        text="medical_abstract",
        label="condition_label",
        format="csv",
        label_names=codes,
        name="medical_abstracts",
    )
    ds.label_names = [names[c] for c in codes]
    return _check_rows(ds, path, set(range(len(codes))))


def _load_pubmedqa(data_dir: Path | None) -> Dataset:
    path = _data_file(data_dir, "pubmedqa_pqal.json")
    ds = load_table(
        path,
        text="QUESTION",
        text_pair="CONTEXTS",
        label="final_decision",
        format="json",
        label_names=["yes", "no", "maybe"],
        name="pubmedqa",
    )
    return _check_rows(ds, path)


def _load_mqp(data_dir: Path | None) -> Dataset:
    path = _data_file(data_dir, "mqp.csv")
    ds = load_table(
        path,
        text="question_1",
        text_pair="question_2",
        label="label",
        format="csv",
        fieldnames=["dr_id", "question_1", "question_2", "label"],
        label_names=["dissimilar", "similar"],
        name="mqp",
    )
    return _check_rows(ds, path, {0, 1})


def _load_medical_sample(data_dir: Path | None) -> Dataset:
    del data_dir  # generated, no files
    return generate_medical_sample()


# --------------------------------------------------------------------------------------------
# medical_sample: synthetic abstract-like texts over the five medical_abstracts conditions.
# Every text names its condition through a few class-specific terms, but many also mention a
# comorbidity or finding of another class and some carry only weak (organ / procedure) cues,
# so a model has to weigh the evidence rather than spot one keyword.
# --------------------------------------------------------------------------------------------

# fmt: off
_VOCAB: dict[str, dict[str, list[str]]] = {
    "neoplasms": {
        "disease": [
            "breast carcinoma", "non-small cell lung cancer", "malignant melanoma",
            "hepatocellular carcinoma", "diffuse large B-cell lymphoma", "prostate adenocarcinoma",
            "ovarian carcinoma", "glioblastoma", "squamous cell carcinoma of the head and neck",
            "soft tissue sarcoma", "acute myeloid leukemia", "metastatic renal cell carcinoma",
        ],
        "intervention": [
            "adjuvant chemotherapy", "radical resection", "external beam radiotherapy",
            "neoadjuvant tamoxifen", "cisplatin-based chemotherapy", "wide local excision",
            "autologous bone marrow transplantation", "interferon alfa",
        ],
        "measure": [
            "tumor size", "disease-free survival", "the rate of local recurrence",
            "lymph node metastasis", "overall survival", "tumor grade",
            "the complete remission rate", "serum tumor markers",
        ],
        "finding": [
            "distant metastases", "a palpable mass", "positive surgical margins",
            "histologic evidence of malignancy", "an enlarging pulmonary nodule",
        ],
        "place": ["the oncology clinic", "a regional cancer center"],
        "exam": ["tumor biopsy", "computed tomography staging", "histologic grading"],
    },
    "digestive system diseases": {
        "disease": [
            "Crohn's disease", "ulcerative colitis", "chronic pancreatitis", "gastric ulcer",
            "alcoholic cirrhosis", "gastroesophageal reflux disease", "acute cholecystitis",
            "celiac disease", "chronic hepatitis C", "diverticulitis",
            "bleeding esophageal varices", "duodenal ulcer",
        ],
        "intervention": [
            "omeprazole", "endoscopic sclerotherapy", "laparoscopic cholecystectomy",
            "a gluten-free diet", "mesalamine", "Helicobacter pylori eradication therapy",
            "bowel resection", "endoscopic retrograde cholangiopancreatography",
        ],
        "measure": [
            "mucosal healing", "serum aminotransferase levels", "stool frequency",
            "the rate of ulcer healing", "esophageal acid exposure", "serum bilirubin",
            "rebleeding", "the endoscopic score",
        ],
        "finding": [
            "abdominal pain", "rectal bleeding", "jaundice", "ascites",
            "mucosal inflammation on colonoscopy",
        ],
        "place": ["the gastroenterology unit", "a liver transplant center"],
        "exam": ["upper endoscopy", "colonoscopy", "liver function testing"],
    },
    "nervous system diseases": {
        "disease": [
            "multiple sclerosis", "Parkinson's disease", "Alzheimer's disease", "epilepsy",
            "amyotrophic lateral sclerosis", "migraine", "Guillain-Barre syndrome",
            "myasthenia gravis", "peripheral neuropathy", "bacterial meningitis",
            "traumatic brain injury", "Huntington's disease",
        ],
        "intervention": [
            "levodopa", "carbamazepine", "interferon beta", "deep brain stimulation",
            "intravenous immunoglobulin", "sumatriptan", "plasma exchange",
            "cholinesterase inhibitors",
        ],
        "measure": [
            "seizure frequency", "the disability score", "cognitive performance",
            "nerve conduction velocity", "motor function", "headache frequency",
            "the relapse rate", "cerebrospinal fluid protein",
        ],
        "finding": [
            "focal seizures", "muscle weakness", "memory impairment", "tremor",
            "white matter lesions on magnetic resonance imaging",
        ],
        "place": ["the neurology department", "an epilepsy center"],
        "exam": ["electroencephalography", "lumbar puncture", "a neurologic examination"],
    },
    "cardiovascular diseases": {
        "disease": [
            "acute myocardial infarction", "congestive heart failure", "atrial fibrillation",
            "essential hypertension", "unstable angina", "aortic stenosis",
            "dilated cardiomyopathy", "coronary artery disease", "deep venous thrombosis",
            "abdominal aortic aneurysm", "ventricular tachycardia", "peripheral arterial disease",
        ],
        "intervention": [
            "coronary angioplasty", "intravenous streptokinase", "metoprolol", "enalapril",
            "coronary artery bypass grafting", "warfarin anticoagulation", "digoxin",
            "aortic valve replacement",
        ],
        "measure": [
            "left ventricular ejection fraction", "systolic blood pressure",
            "the incidence of reinfarction", "exercise tolerance", "cardiac output",
            "heart rate variability", "restenosis", "plasma renin activity",
        ],
        "finding": [
            "chest pain", "ST-segment elevation", "a systolic murmur",
            "left ventricular hypertrophy", "palpitations",
        ],
        "place": ["the cardiology unit", "the coronary care unit"],
        "exam": ["echocardiography", "exercise electrocardiography", "cardiac catheterization"],
    },
    "general pathological conditions": {
        "disease": [
            "septic shock", "systemic inflammation", "chronic hypoxia", "morbid obesity",
            "multiple organ failure", "hypothermia", "severe burns", "malnutrition",
            "fever of unknown origin", "hemorrhagic shock", "dehydration", "reperfusion injury",
        ],
        "intervention": [
            "fluid resuscitation", "enteral nutrition", "corticosteroids",
            "mechanical ventilation", "hyperbaric oxygen", "active rewarming",
            "broad-spectrum antibiotics", "weight reduction",
        ],
        "measure": [
            "serum lactate", "body temperature", "C-reactive protein", "mortality",
            "oxygen consumption", "body mass index", "cytokine levels",
            "the length of hospital stay",
        ],
        "finding": [
            "hypotension", "leukocytosis", "edema", "weight loss", "metabolic acidosis",
        ],
        "place": ["the intensive care unit", "a burn center"],
        "exam": ["blood gas analysis", "routine laboratory testing", "postmortem examination"],
    },
}
# fmt: on

_OPENERS = [
    "We studied {n} patients with {disease}.",
    "A prospective study of {n} patients with {disease} was performed.",
    "{Disease} was diagnosed in {n} consecutive patients seen at {place}.",
    "This randomized trial enrolled {n} adults with {disease}.",
    "We reviewed the records of {n} patients treated for {disease}.",
    "The aim of this study was to assess {intervention} in {disease}.",
]
_METHODS = [
    "Patients received {intervention} or {intervention2}.",
    "Half of the patients were assigned to {intervention}.",
    "All patients underwent {exam} before and after {intervention}.",
    "Treatment with {intervention} lasted {weeks} weeks.",
    "The primary end point was {measure}.",
]
_RESULTS = [
    "{Measure} improved in {pct} percent of the treated group.",
    "{Intervention} reduced {measure} compared with placebo (p less than 0.05).",
    "In {pct} percent of cases we observed {finding}.",
    "There was no significant difference in {measure} between the groups.",
    "{Measure} was associated with {finding}.",
]
_COMORBID = [
    "{n2} patients also had {other_disease}.",
    "A history of {other_disease} was noted in {n2} patients.",
    "During follow-up {n2} patients developed {other_finding}.",
    "Patients with {other_disease} were excluded.",
]
_CLOSERS = [
    "These results suggest that {intervention} is useful in {disease}.",
    "{Measure} may predict outcome in {disease}.",
    "Further trials of {intervention} are warranted.",
    "We conclude that {finding} should prompt early evaluation.",
    "The findings support routine assessment of {measure}.",
]


_VAGUE = ["this condition", "the disorder", "their illness", "the disease under study"]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _sample_text(rng: random.Random, cls: str) -> str:
    v = _VOCAB[cls]
    others = [c for c in _VOCAB if c != cls]

    def pick_other() -> dict[str, list[str]]:
        return _VOCAB[rng.choice(others)]

    other = pick_other()
    weak = rng.random() < 0.2  # a text whose disease is not named: only indirect cues
    slots = {
        "n": str(rng.randint(12, 480)),
        "pct": str(rng.randint(8, 85)),
        "weeks": str(rng.randint(2, 52)),
        "disease": rng.choice(_VAGUE if weak else v["disease"]),
        "intervention": rng.choice(v["intervention"]),
        "intervention2": rng.choice(v["intervention"] + other["intervention"]),
        "measure": rng.choice(v["measure"]),
        "finding": rng.choice(v["finding"]),
        "place": rng.choice(v["place"]),
        "exam": rng.choice(v["exam"]),
    }
    if weak:  # the treatment and end point may come from another condition too
        slots["intervention"] = rng.choice(v["intervention"] + other["intervention"])
        slots["measure"] = rng.choice(v["measure"] + other["measure"])

    def fill(template: str) -> str:
        other = pick_other()
        values = dict(
            slots,
            n2=str(rng.randint(2, 40)),
            other_disease=rng.choice(other["disease"]),
            other_finding=rng.choice(other["finding"]),
        )
        values.update({_cap(k): _cap(val) for k, val in list(values.items())})
        return template.format(**values)

    parts = [fill(rng.choice(_OPENERS)), fill(rng.choice(_METHODS)), fill(rng.choice(_RESULTS))]
    n_comorbid = rng.choices([0, 1, 2], weights=[0.45, 0.4, 0.15])[0]
    for _ in range(n_comorbid):
        parts.insert(rng.randint(1, len(parts)), fill(rng.choice(_COMORBID)))
    if rng.random() < 0.7:
        parts.append(fill(rng.choice(_CLOSERS)))
    return " ".join(parts)


def generate_medical_sample(n: int = 400, seed: int = 0) -> Dataset:
    """Generate the ``medical_sample`` dataset: synthetic abstract-like texts.

    Texts are assembled from sentence templates and condition-specific vocabulary over the
    same five conditions as medical_abstracts (:data:`MEDICAL_CONDITIONS`), with balanced
    classes. About a fifth carry only indirect cues and about half mention a comorbidity
    from another class, so the task is learnable by a small model but not a keyword lookup.
    Nothing is copied from the real corpus. The output depends only on ``n`` and ``seed``.

    Args:
        n: Number of examples (>= 5).
        seed: Generator seed.

    Returns:
        The dataset, named ``medical_sample``.

    Raises:
        DataError: ``n`` is below 5.
    """
    if n < len(MEDICAL_CONDITIONS):
        raise DataError(f"medical_sample needs n >= {len(MEDICAL_CONDITIONS)}, got {n}")
    rng = random.Random(f"shieldtune-medical-sample:{seed}")
    labels = [i % len(MEDICAL_CONDITIONS) for i in range(n)]
    rng.shuffle(labels)
    examples = [Example(text=_sample_text(rng, MEDICAL_CONDITIONS[y]), label=y) for y in labels]
    return Dataset(examples=examples, label_names=list(MEDICAL_CONDITIONS), name="medical_sample")


_REGISTRY.register(
    "medical_abstracts",
    _Entry(
        BuiltinInfo(
            name="medical_abstracts",
            task="single",
            files=("medical_abstracts.csv", "medical_abstracts_labels.csv"),
            description="patient condition (5 classes) of a PubMed abstract; 2,888 rows",
            source=(
                "Schopf, Braun, Matthes, 'Evaluating Unsupervised Text Classification' "
                "(NLPIR 2022), sebischair/Medical-Abstracts-TC-Corpus, test split"
            ),
            licence="CC BY-SA 3.0",
        ),
        _load_medical_abstracts,
    ),
)
_REGISTRY.register(
    "pubmedqa",
    _Entry(
        BuiltinInfo(
            name="pubmedqa",
            task="pair",
            files=("pubmedqa_pqal.json",),
            description="question + abstract contexts -> yes / no / maybe; 1,000 rows",
            source="Jin et al., 'PubMedQA' (EMNLP 2019), pubmedqa/pubmedqa, PQA-L",
            licence="MIT",
        ),
        _load_pubmedqa,
    ),
)
_REGISTRY.register(
    "mqp",
    _Entry(
        BuiltinInfo(
            name="mqp",
            task="pair",
            files=("mqp.csv",),
            description="medical question pair similarity (dissimilar / similar); 3,048 rows",
            source=(
                "McCreery et al., 'Effective Transfer Learning for Identifying Similar "
                "Questions' (Curai, 2020), curai/medical-question-pair-dataset"
            ),
            licence="see curai/medical-question-pair-dataset",
        ),
        _load_mqp,
    ),
)
_REGISTRY.register(
    "medical_sample",
    _Entry(
        BuiltinInfo(
            name="medical_sample",
            task="single",
            files=(),
            description=(
                "400 synthetic abstract-like texts over the 5 medical_abstracts conditions, "
                "generated by shieldtune (no external data)"
            ),
            source="generated by shieldtune.data.builtin.generate_medical_sample",
            licence="Apache-2.0 (part of shieldtune)",
        ),
        _load_medical_sample,
    ),
)

BUILTIN_DATASETS: tuple[str, ...] = tuple(_REGISTRY.names())
"""Names accepted by :func:`load_builtin`."""


def builtin_info(name: str) -> BuiltinInfo:
    """Describe a built-in dataset (task, files, source, licence).

    Args:
        name: One of :data:`BUILTIN_DATASETS`.

    Returns:
        Its description.

    Raises:
        ConfigError: Unknown name; the message lists the accepted names.
    """
    return _REGISTRY.get(name, "dataset").info


def load_builtin(name: str, data_dir: Path | str | None = None) -> Dataset:
    """Load a built-in dataset by name.

    Args:
        name: One of :data:`BUILTIN_DATASETS`: ``medical_abstracts``, ``pubmedqa``, ``mqp``
            (read from the data folder) or ``medical_sample`` (generated, needs no folder).
        data_dir: Folder holding the data files; None to use :func:`resolve_data_dir`.

    Returns:
        The dataset, named ``name``, labels ``0..K-1`` with their names.

    Raises:
        ConfigError: Unknown name; the message lists the accepted names.
        DataError: The data folder or a file is missing or malformed; the message says where
            it looked and how to point at the folder.
    """
    entry = _REGISTRY.get(name, "dataset")
    return entry.load(Path(data_dir) if data_dir is not None else None)
