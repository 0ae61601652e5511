"""The mixofshow web app (Gradio): train, fuse, sample and browse runs, with durable jobs.

``mixofshow app`` or ``python -m app`` starts it; see the README's "Web app" section. The app is
thin over the library: ``app/worker.py`` calls ``mixofshow.train``, ``mixofshow.fuse`` and
``mixofshow.sample``; the pages only build configs and read what the jobs write.
"""

__all__: list[str] = []
