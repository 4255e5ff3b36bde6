"""The int8 all-MiniLM-L6-v2 recipe (export_embedding.build_int8) against the fp32 export.

Issue 15's rule serves a quantized embedding only at a minimum cosine to fp32 of 0.99. Builds both
variants from the packaged checkpoint into a temporary folder (about a minute on two cores) and
embeds sentences like the ones the knowledge base indexes: scientific claims and abstract
sentences, support questions, short and long ones. Quantizing every MatMul (the recipe before)
leaves two of these claims at 0.989; this recipe keeps them all above 0.994. A text of one word
is outside the bound with either ("Yes.": 0.964 before, 0.974 now), as a mean over three tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from llmos.embedding import EmbeddingModel
from llmos.models import export_embedding, get_spec, locate_source

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SENTENCES = [
    "0-dimensional biomaterials show inductive properties.",
    "Vitamin D supplementation reduces the risk of fractures in elderly women.",
    "Mutations in BRCA1 increase the lifetime risk of breast and ovarian cancer.",
    "The incidence of type 2 diabetes rose sharply among adolescents between 2001 and 2017.",
    "Macrophages polarize towards an M2 phenotype in the tumour microenvironment.",
    "We performed a randomized, double-blind, placebo-controlled trial in 1,204 patients.",
    "Knockdown of the gene by siRNA abolished the phosphorylation of ERK1/2 (p < 0.001).",
    "CRISPR-Cas9 editing restored dystrophin expression in mdx mice.",
    "Results: The hazard ratio for all-cause mortality was 0.82 (95% CI, 0.71-0.95).",
    "Antibiotic exposure in infancy alters the composition of the gut microbiota.",
    "Telomere length is inversely associated with chronological age.",
    "Statins lower LDL cholesterol but do not affect HDL levels.",
    "Background: Sepsis remains a leading cause of death in intensive care units worldwide.",
    "Chronic sleep deprivation impairs glucose tolerance in healthy young men.",
    "How do I reset my password?",
    "Our refund policy allows returns within 30 days.",
    "The invoice was charged twice on my credit card.",
    "A cat sat on the mat.",
    "LLM OS serves language, retrieval and speech models as small services.",
    "The quick brown fox jumps over the lazy dog. " * 40,
    (
        "Methods: Cohort study of 4,512 adults followed for a median of 8.3 years. Exposure was "
        "assessed with a validated food-frequency questionnaire, and incident cardiovascular "
        "events were adjudicated by an independent committee blinded to exposure status. "
        "Conclusions: Higher intake of ultra-processed food was associated with a higher risk."
    ),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    source = locate_source(get_spec("all-minilm-l6-v2"))
    folders = {}
    for variant, build in (("fp32", export_embedding.build_fp32), ("int8", export_embedding.build_int8)):
        out = tmp_path_factory.mktemp(variant)
        build(source, out, tmp_path_factory.mktemp(f"{variant}-scratch"), lambda _: None)
        folders[variant] = out
    return folders


def test_int8_keeps_the_feed_forward_down_projections_fp32(exports: dict[str, Path]) -> None:
    graph = onnx.load(str(exports["int8"] / export_embedding.MODEL_NAME)).graph
    weights = {initializer.name for initializer in graph.initializer}
    # fp32 MatMuls with a weight (attention's query-key and probability-value products have none).
    float_layers = sorted(node.name for node in graph.node if node.op_type == "MatMul" and set(node.input) & weights)
    assert float_layers == [f"/encoder/encoder/layer.{i}/output/dense/MatMul" for i in range(6)]
    # The other five projections of each of the six layers run on int8.
    assert sum(node.op_type == "MatMulInteger" for node in graph.node) == 6 * 5


def test_int8_embeddings_stay_within_cosine_0_99_of_fp32(exports: dict[str, Path]) -> None:
    fp32 = EmbeddingModel.from_dir(exports["fp32"], threads=2).embed(SENTENCES)
    int8 = EmbeddingModel.from_dir(exports["int8"], threads=2).embed(SENTENCES)
    cosines = (fp32 * int8).sum(axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    assert cosines.min() >= 0.99, np.round(cosines, 4).tolist()
