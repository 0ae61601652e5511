"""The one error type the tabs raise for a user's mistake."""

from __future__ import annotations

import html

import gradio as gr

__all__ = ["UserError"]


class UserError(gr.Error):
    """A ``gr.Error`` shown as plain text: Gradio renders the message as HTML, where words like
    ``<robot1>`` would vanish as unknown tags, so the message is escaped once, here."""

    def __init__(self, message: object, **kwargs) -> None:
        super().__init__(html.escape(str(message), quote=False), **kwargs)
