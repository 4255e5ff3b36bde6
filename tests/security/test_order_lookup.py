"""Order look-ups need more than the order number (issue 13, item 6).

Order numbers are short and sequential-looking (NW- and six digits): anyone could walk them and
read every customer's orders. The order-status flow asks for the e-mail address or postcode the
order was placed with, and answers a wrong e-mail exactly as it answers an order that does not
exist, so the replies tell nothing about which numbers are real. Against the real stack and the
demo order data (demo/orders.yaml: NW-777001 of acme).
"""

from __future__ import annotations

import grpc
import pytest

from llmos.v1 import dialogue_pb2, dialogue_pb2_grpc
from tests.conftest import RunningStack
from tests.grpc_helpers import ACME_USER, GLOBEX_USER

pytestmark = pytest.mark.security

ORDER, EMAIL, POSTCODE = "NW-777001", "jonas.berg@example.com", "20095"  # demo/orders.yaml
UNKNOWN = "NW-123457"
STATUS_WORDS = ("Shipped", "GLS", "Fleece")  # what the order's status reply would reveal


async def conversation(stack: RunningStack, *messages: str, metadata: tuple[tuple[str, str], ...] = ACME_USER) -> list[str]:
    """The assistant's reply to each message, all in one session."""
    replies: list[str] = []
    session_id = ""
    async with grpc.aio.insecure_channel(stack.addr("dialogue")) as channel:
        dialogue = dialogue_pb2_grpc.DialogueServiceStub(channel)
        for message in messages:
            request = dialogue_pb2.ChatRequest(session_id=session_id, message=message)
            responses = [response async for response in dialogue.Chat(request, metadata=metadata, timeout=180)]
            session_id = responses[0].session_id
            replies.append("".join(response.delta for response in responses))
    return replies


def reveals_status(reply: str) -> bool:
    return any(word in reply for word in STATUS_WORDS)


@pytest.mark.timeout(600)
async def test_an_order_number_alone_reveals_nothing_and_a_wrong_email_looks_like_no_order(stack: RunningStack) -> None:
    asked, wrong_email = await conversation(stack, f"Where is my order {ORDER}?", "my e-mail is someone.else@example.com")
    assert not reveals_status(asked) and "postcode" in asked and "e-mail" in asked, asked
    assert not reveals_status(wrong_email), wrong_email

    _, unknown_email = await conversation(stack, f"Where is my order {UNKNOWN}?", "my e-mail is someone.else@example.com")
    _, wrong_postcode = await conversation(stack, f"Where is my order {ORDER}?", "the postcode is 10115")
    _, unknown_postcode = await conversation(stack, f"Where is my order {UNKNOWN}?", "the postcode is 10115")
    # No oracle: the same words whether the order exists or not, the number aside.
    replies = {reply.replace(ORDER, "NW-#").replace(UNKNOWN, "NW-#") for reply in (wrong_email, unknown_email, wrong_postcode, unknown_postcode)}
    assert len(replies) == 1, replies
    # Another tenant's customer with the right e-mail finds nothing either, in the same words.
    _, other_tenant = await conversation(stack, f"Where is my order {ORDER}?", f"it's {EMAIL}", metadata=GLOBEX_USER)
    assert other_tenant.replace(ORDER, "NW-#") in replies


@pytest.mark.timeout(600)
async def test_the_orders_email_or_postcode_opens_it(stack: RunningStack) -> None:
    *_, by_postcode = await conversation(stack, "Where is my order?", ORDER.removeprefix("NW-"), f"postcode {POSTCODE}")
    assert reveals_status(by_postcode) and ORDER in by_postcode, by_postcode
    (in_one_message,) = await conversation(stack, f"Where is order {ORDER}? My e-mail is {EMAIL.upper()}")
    assert reveals_status(in_one_message), in_one_message
