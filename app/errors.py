"""The one error type the tabs raise for a user's mistake."""

from __future__ import annotations

import html

import gradio as gr

__all__ = ["UserError", "form_number"]


class UserError(gr.Error):
    """A ``gr.Error`` shown as plain text: Gradio renders the message as HTML, where words like
    ``<robot1>`` would vanish as unknown tags, so the message is escaped here. ``gr.Error`` is a
    ``ValueError``, so a handler may wrap the text of one again: unescaping first keeps the
    escaping single."""

    def __init__(self, message: object, **kwargs) -> None:
        super().__init__(html.escape(html.unescape(str(message)), quote=False), **kwargs)


def form_number(value: object, field: str, kind: type = int) -> int | float:
    """A form field's number, or a ``ValueError`` naming the field and the value (the handlers turn
    ``ValueError`` into :class:`UserError`)."""
    try:
        number = float(value)  # type: ignore[arg-type]
        if kind is int and not number.is_integer():
            raise ValueError
        return int(number) if kind is int else number
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{field}: expected {what}, got {value!r}") from None
