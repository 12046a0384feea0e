"""``controlnet-emo app``: a local Gradio page over a trained run (``engine`` holds the model
logic, ``ui`` the page and ``launch``)."""
