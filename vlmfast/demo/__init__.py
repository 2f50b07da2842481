"""The Gradio demo (``vlmfast demo``): ``engine`` holds the logic (no Gradio import), ``render`` the pictures,
``app`` the page. Install with ``pip install 'vlmfast[demo]'``; docs in README.md (Demo)."""
