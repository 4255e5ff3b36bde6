"""The prompt of one turn, built within the model's context budget.

In order of importance: the system prompt and the user's message (always), the retrieved passages
(best first), the running summary of older turns, then recent turns verbatim, newest first, as
many as fit. (Turns older than the recent-turn window live on in the running summary, which the
caller keeps; see `DialogueCore`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmos.errors import InvalidArgument
from services.dialogue.backends import Passage, TokenCounter

# Tokens the chat template adds around each message (role header and end marker).
TEMPLATE_TOKENS_PER_MESSAGE = 8

SYSTEM_PROMPT = (
    "You are the customer-service assistant of Northwind Outfitters. Answer the customer's question "
    "using only the numbered passages from the help centre below. Be brief and concrete. Mention the "
    "passage you used as [1], [2] and so on. If the passages do not contain the answer, say that you "
    "do not know."
)
# Added for an answer that will be spoken: listeners cannot skim, and lists and marks read badly.
SPOKEN_STYLE = " Your answer will be read aloud: answer in one or two short sentences, without lists or formatting."


@dataclass(frozen=True)
class PastTurn:
    user: str
    answer: str


@dataclass(frozen=True)
class BuiltPrompt:
    messages: list[tuple[str, str]]  # (role, content), ready for the chat template
    passages: list[Passage]  # the passages that made it in, numbered from 1 in this order
    prompt_tokens: int
    dropped_turns: int  # recent turns left out because the budget was tight


def passage_text(number: int, passage: Passage) -> str:
    return f"[{number}] {passage.title}\n{passage.text}"


async def build_prompt(
    tokens: TokenCounter,
    budget: int,
    message: str,
    passages: Sequence[Passage],
    summary: str,
    turns: Sequence[PastTurn],
    timeout_s: float,
    spoken: bool = False,
) -> BuiltPrompt:
    instructions = SYSTEM_PROMPT + (SPOKEN_STYLE if spoken else "")
    passage_texts = [passage_text(number, passage) for number, passage in enumerate(passages, 1)]
    turn_texts = [text for turn in turns for text in (turn.user, turn.answer)]
    counts = await tokens.count([instructions, message, summary, *passage_texts, *turn_texts], timeout_s)
    system_tokens, message_tokens, summary_tokens = counts[:3]
    passage_tokens = counts[3:3 + len(passage_texts)]
    turn_tokens = counts[3 + len(passage_texts):]

    used = system_tokens + message_tokens + 2 * TEMPLATE_TOKENS_PER_MESSAGE
    if used > budget:
        raise InvalidArgument("message", f"is {message_tokens} tokens; with the instructions it exceeds the {budget}-token prompt budget")
    kept_passages: list[Passage] = []
    for passage, count in zip(passages, passage_tokens, strict=True):
        if used + count + 2 > budget:
            break
        kept_passages.append(passage)
        used += count + 2
    use_summary = bool(summary) and used + summary_tokens + TEMPLATE_TOKENS_PER_MESSAGE <= budget
    if use_summary:
        used += summary_tokens + TEMPLATE_TOKENS_PER_MESSAGE

    kept_turns: list[int] = []
    for index in range(len(turns) - 1, -1, -1):
        cost = turn_tokens[2 * index] + turn_tokens[2 * index + 1] + 2 * TEMPLATE_TOKENS_PER_MESSAGE
        if used + cost > budget:
            break
        kept_turns.append(index)
        used += cost
    first_kept = min(kept_turns) if kept_turns else len(turns)

    system = instructions
    if kept_passages:
        system += "\n\nHelp-centre passages:\n" + "\n\n".join(passage_texts[: len(kept_passages)])
    if use_summary:
        system += f"\n\nEarlier in this conversation: {summary}"
    messages: list[tuple[str, str]] = [("system", system)]
    for turn in turns[first_kept:]:
        messages.extend((("user", turn.user), ("assistant", turn.answer)))
    messages.append(("user", message))
    return BuiltPrompt(messages, kept_passages, used, first_kept)
