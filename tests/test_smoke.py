from tests.conftest import Chat
from tests.helpers import receive_json


async def test_two_members_chat(chat: Chat) -> None:
    room = await chat.room()
    alice, _ = await chat.join(room)
    bob, bob_joined = await chat.join(room)
    assert (await receive_json(alice)) == bob_joined
    await alice.send_str("hello")
    echo = await receive_json(alice)
    assert echo == await receive_json(bob)
    assert echo["message"] == "hello"
