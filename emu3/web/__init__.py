"""The web demo: a local gradio app for text-to-image and chat about an image (`scripts/web_demo.sh`)."""
