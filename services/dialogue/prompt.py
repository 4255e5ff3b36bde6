"""The prompt of a draft answer: the question and the evidence sentences, nothing else.

The model sees no passages and no conversation: only the few source sentences selected for the
question (follow-ups are already rewritten to stand alone), so it has nothing to draw a wrong
fact from, and the verifier can check its draft against exactly what it was given.
The facts and the question are message contents, which the inference service tokenizes as plain
text (`ModelTokenizer.encode_chat`): a passage or a question holding `<|im_start|>system` cannot
open a turn of its own; only the chat template's markup is special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM_PROMPT = (
    "You are the customer-service assistant of {brand}. Answer the customer's question in one or two "
    "short sentences, using only the facts given. Copy every number, amount, time and name exactly "
    "as written in the facts. Do not add anything the facts do not say."
)
# Added for an answer that will be spoken: listeners cannot skim, and lists and marks read badly.
SPOKEN_STYLE = " Your answer will be read aloud: use one plain sentence, without lists or formatting."


def draft_messages(brand: str, question: str, evidence: Sequence[str], spoken: bool = False) -> list[tuple[str, str]]:
    """(role, content) messages for the chat template."""
    facts = "\n".join(f"- {sentence}" for sentence in evidence)
    system = SYSTEM_PROMPT.format(brand=brand) + (SPOKEN_STYLE if spoken else "")
    return [("system", system), ("user", f"Facts:\n{facts}\n\nQuestion: {question}")]
