"""Intent classification: the intents file, the trainer, the calibrated classifier and its artefact.

One implementation, used by the dialogue service (trained at start when the artefact is missing or
the intents file changed) and by `llmos eval intents` (trained on a benchmark's train split).

Features are the MiniLM sentence embedding (the vectors the inference service serves, computed by
`llmos.embedding.EmbeddingModel`) next to word and character n-gram TF-IDF of the same text: the
embedding carries meaning, the n-grams carry the exact wording that tells close intents apart
(e.g. "card arrival" vs "card delivery estimate"). A linear SVM is trained on them.

Out-of-scope detection: examples labelled `out_of_scope` are a class of their own, and a message
whose calibrated confidence is under a threshold is out of scope too. The confidence is
P(prediction correct | evidence), a logistic model fitted on out-of-fold predictions of the
training data, over two pieces of evidence: the SVM's score of the best intent (how far the message
is on that intent's side, not merely ahead of the runner-up: a message unlike every intent has a
low top score even when one intent wins clearly) and the cosine similarity of the message to the
nearest training example of that intent (a message far from all of an intent's examples is
probably not that intent). The threshold is the highest one that keeps the out-of-fold in-scope
accuracy at or above a target, so it is never tuned on the data a result is reported on.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy.sparse import csr_matrix, hstack, spmatrix
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from llmos.errors import FailedPrecondition, InvalidArgument

OUT_OF_SCOPE = "out_of_scope"
# The embedding block is weighted against the TF-IDF blocks (each L2-normalized to 1).
EMBEDDING_WEIGHT = 2.0
SVM_C = 0.5
CALIBRATION_FOLDS = 5
# Bumped when the artefact's contents change, so older artefacts are retrained rather than misread.
ARTEFACT_VERSION = 2
ARTEFACT_FILE = "classifier.pkl"
REPORT_FILE = "calibration.json"

Embed = Callable[[Sequence[str]], Awaitable[np.ndarray]]


@dataclass(frozen=True)
class IntentData:
    texts: list[str]
    labels: list[str]  # OUT_OF_SCOPE for negative examples

    @property
    def intents(self) -> list[str]:
        return sorted({label for label in self.labels if label != OUT_OF_SCOPE})


def load_intents_file(path: Path) -> IntentData:
    """Read a Rasa-NLU-like YAML: `intents: {name: [examples]}` and optional `out_of_scope: [examples]`."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise FailedPrecondition(f"cannot read the intents file {path}: {exc}") from None
    intents = document.get("intents") if isinstance(document, dict) else None
    if not isinstance(intents, dict) or len(intents) < 2:
        raise InvalidArgument(str(path), "needs an `intents:` mapping of at least two intents to example lists")
    texts: list[str] = []
    labels: list[str] = []
    for name, examples in intents.items():
        if name == OUT_OF_SCOPE:
            raise InvalidArgument(str(path), f"`{OUT_OF_SCOPE}` is reserved; list those examples at the top level")
        if not isinstance(examples, list) or len(examples) < CALIBRATION_FOLDS:
            raise InvalidArgument(str(path), f"intent {name!r} needs at least {CALIBRATION_FOLDS} examples")
        texts.extend(str(example) for example in examples)
        labels.extend([str(name)] * len(examples))
    negatives = document.get(OUT_OF_SCOPE) or []
    texts.extend(str(example) for example in negatives)
    labels.extend([OUT_OF_SCOPE] * len(negatives))
    return IntentData(texts, labels)


@dataclass(frozen=True)
class Prediction:
    intent: str  # OUT_OF_SCOPE when the classifier is not confident enough
    confidence: float  # calibrated probability that the best-scoring intent is right
    best_intent: str  # the best-scoring class before the threshold was applied


@dataclass(frozen=True)
class Calibration:
    """How the threshold was chosen: on out-of-fold predictions of the training data, or on a
    held-out calibration set when one was given."""

    threshold: float
    target_in_scope_accuracy: float
    in_scope_accuracy: float  # on the calibration predictions, at the threshold
    oos_recall: float  # on the calibration predictions, at the threshold; 0 when there were no negative examples
    in_scope_examples: int
    oos_examples: int
    source: str = "out-of-fold training predictions"


@dataclass(frozen=True)
class LabelledSet:
    """Examples held out from training, with their embedding vectors."""

    texts: list[str]
    labels: list[str]
    vectors: np.ndarray


class _Featurizer:
    def __init__(self) -> None:
        self._words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        self._chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)

    def fit_transform(self, texts: Sequence[str], vectors: np.ndarray) -> spmatrix:
        words = self._words.fit_transform(texts)
        chars = self._chars.fit_transform(texts)
        return hstack([csr_matrix(vectors * EMBEDDING_WEIGHT), words, chars]).tocsr()

    def transform(self, texts: Sequence[str], vectors: np.ndarray) -> spmatrix:
        return hstack(
            [csr_matrix(vectors * EMBEDDING_WEIGHT), self._words.transform(texts), self._chars.transform(texts)]
        ).tocsr()


def _fit(texts: Sequence[str], vectors: np.ndarray, labels: np.ndarray) -> tuple[_Featurizer, LinearSVC]:
    featurizer = _Featurizer()
    features = featurizer.fit_transform(texts, vectors)
    return featurizer, LinearSVC(C=SVM_C).fit(features, labels)


def _best(svm: LinearSVC, features: spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Best class and its SVM score, per row."""
    scores = svm.decision_function(features)
    best = scores.argmax(axis=1)
    return svm.classes_[best], scores[np.arange(len(scores)), best]


def _nearest_of_intent(vectors: np.ndarray, intents: np.ndarray, examples: np.ndarray, example_intents: np.ndarray) -> np.ndarray:
    """Per row: cosine similarity to the closest example labelled with that row's intent (vectors are unit length)."""
    similarity = vectors @ examples.T
    nearest = np.full(len(vectors), -1.0)
    for intent in np.unique(intents):
        rows = intents == intent
        columns = example_intents == intent
        if columns.any():
            nearest[rows] = similarity[np.ix_(rows, columns)].max(axis=1)
    return nearest


def _evidence(top_score: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    return np.column_stack([top_score, nearest])


class IntentClassifier:
    def __init__(
        self,
        featurizer: _Featurizer,
        svm: LinearSVC,
        examples: np.ndarray,
        example_intents: np.ndarray,
        confidence_model: LogisticRegression,
        calibration: Calibration,
    ) -> None:
        self._featurizer = featurizer
        self._svm = svm
        self._examples = examples
        self._example_intents = example_intents
        self._confidence_model = confidence_model
        self.calibration = calibration

    @property
    def intents(self) -> list[str]:
        return [str(label) for label in self._svm.classes_ if label != OUT_OF_SCOPE]

    def predict(self, texts: Sequence[str], vectors: np.ndarray, threshold: float | None = None) -> list[Prediction]:
        """Classify; `threshold` overrides the calibrated one (e.g. to trace a recall curve)."""
        if not texts:
            return []
        cut = self.calibration.threshold if threshold is None else threshold
        best, top_score = _best(self._svm, self._featurizer.transform(texts, vectors))
        nearest = _nearest_of_intent(vectors, best, self._examples, self._example_intents)
        confidence = self._confidence_model.predict_proba(_evidence(top_score, nearest))[:, 1]
        return [
            Prediction(OUT_OF_SCOPE if score < cut else str(label), float(score), str(label))
            for label, score in zip(best, confidence, strict=True)
        ]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{ARTEFACT_FILE}.partial"
        with partial.open("wb") as handle:
            pickle.dump(
                (ARTEFACT_VERSION, self._featurizer, self._svm, self._examples, self._example_intents, self._confidence_model,
                 self.calibration),
                handle,
            )
        partial.replace(folder / ARTEFACT_FILE)
        (folder / REPORT_FILE).write_text(json.dumps(asdict(self.calibration), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> IntentClassifier:
        # Only artefacts this module wrote under $LLMOS_HOME are loaded (pickle is trusted input here).
        with (folder / ARTEFACT_FILE).open("rb") as handle:
            version, *parts = pickle.load(handle)
        if version != ARTEFACT_VERSION:
            raise FailedPrecondition(f"intent classifier in {folder} has format {version}, expected {ARTEFACT_VERSION}; delete it to retrain")
        return cls(*parts)


def _choose_threshold(
    correct: np.ndarray, confidence: np.ndarray, is_oos: np.ndarray, predicted_oos: np.ndarray, target: float, source: str
) -> Calibration:
    """The highest threshold whose in-scope accuracy stays >= target (more rejections, more OOS recall)."""
    in_scope = ~is_oos
    best = Calibration(0.0, target, float(correct[in_scope].mean()), float(predicted_oos[is_oos].mean()) if is_oos.any() else 0.0,
                       int(in_scope.sum()), int(is_oos.sum()), source)
    if not is_oos.any():
        return best
    for threshold in np.unique(confidence):
        rejected = confidence < threshold
        accuracy = float((correct & ~rejected)[in_scope].mean())
        if accuracy < target:
            break
        recall = float((predicted_oos | rejected)[is_oos].mean())
        best = Calibration(float(threshold), target, accuracy, recall, int(in_scope.sum()), int(is_oos.sum()), source)
    return best


def train_intent_classifier(
    texts: Sequence[str],
    labels: Sequence[str],
    vectors: np.ndarray,
    target_in_scope_accuracy: float,
    seed: int = 0,
    threshold_set: LabelledSet | None = None,
) -> IntentClassifier:
    """Train on every example, calibrating confidence and threshold on out-of-fold predictions.

    With `threshold_set` (held-out examples, e.g. a benchmark's validation split) the threshold is
    chosen on the final classifier's predictions of those instead: out-of-fold predictions of a
    training set whose examples resemble each other more than they resemble new messages are
    over-confident, and a threshold chosen on them rejects more in-scope messages than intended.
    """
    y = np.asarray(labels)
    texts = list(texts)
    folds = StratifiedKFold(n_splits=CALIBRATION_FOLDS, shuffle=True, random_state=seed)
    predicted = np.empty(len(y), dtype=object)
    top_score = np.zeros(len(y))
    nearest = np.zeros(len(y))
    for train, held in folds.split(texts, y):
        featurizer, svm = _fit([texts[i] for i in train], vectors[train], y[train])
        predicted[held], top_score[held] = _best(svm, featurizer.transform([texts[i] for i in held], vectors[held]))
        # Nearest examples from this fold's training part only: a message is never its own neighbour.
        nearest[held] = _nearest_of_intent(vectors[held], predicted[held], vectors[train], y[train])
    correct = predicted == y
    evidence = _evidence(top_score, nearest)
    # One anchor of each outcome at the mean evidence keeps the fit defined when every
    # out-of-fold prediction was right (or wrong).
    anchors = np.repeat(evidence.mean(axis=0, keepdims=True), 2, axis=0)
    confidence_model = LogisticRegression().fit(np.vstack([evidence, anchors]), np.append(correct, [True, False]))
    confidence = confidence_model.predict_proba(evidence)[:, 1]
    is_oos = y == OUT_OF_SCOPE
    calibration = _choose_threshold(
        correct, confidence, is_oos, predicted == OUT_OF_SCOPE, target_in_scope_accuracy, Calibration.source
    )
    featurizer, svm = _fit(texts, vectors, y)
    classifier = IntentClassifier(featurizer, svm, np.asarray(vectors, dtype=np.float32), y, confidence_model, calibration)
    if threshold_set is not None:
        held = np.asarray(threshold_set.labels)
        predictions = classifier.predict(threshold_set.texts, threshold_set.vectors, threshold=0.0)
        best = np.array([prediction.best_intent for prediction in predictions])
        classifier.calibration = _choose_threshold(
            best == held, np.array([prediction.confidence for prediction in predictions]), held == OUT_OF_SCOPE,
            best == OUT_OF_SCOPE, target_in_scope_accuracy, f"held-out set of {len(held)} examples",
        )
    return classifier


def artefact_folder(home: Path, intents_file: Path, target_in_scope_accuracy: float) -> Path:
    """Where the classifier of this exact intents file and target lives: rebuilt when either changes."""
    digest = hashlib.sha256(intents_file.read_bytes() + f"|{target_in_scope_accuracy}|{EMBEDDING_WEIGHT}|{SVM_C}|{ARTEFACT_VERSION}".encode())
    return home / "intents" / f"{intents_file.stem}-{digest.hexdigest()[:16]}"


async def ensure_intent_classifier(
    home: Path, intents_file: Path, embed: Embed, target_in_scope_accuracy: float
) -> IntentClassifier:
    """Load the classifier built from `intents_file`, training and saving it first when missing."""
    folder = artefact_folder(home, intents_file, target_in_scope_accuracy)
    if (folder / ARTEFACT_FILE).exists():
        return IntentClassifier.load(folder)
    data = load_intents_file(intents_file)
    classifier = train_intent_classifier(data.texts, data.labels, await embed(data.texts), target_in_scope_accuracy)
    classifier.save(folder)
    return classifier
