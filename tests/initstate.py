"""An initializer and a function sharing module state, for tests that send them by value."""

STATE: dict[str, str] = {}


def remember(tag):
    STATE["tag"] = tag


def recall(_):
    return STATE.get("tag")
