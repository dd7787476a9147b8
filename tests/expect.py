"""Assertions the data tests share."""
import pytest

from common.errors import UserError


def user_error(fn, *args, **kwargs) -> str:
    """Run fn, expect UserError, return its message, which must be one line."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg
