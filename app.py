"""The DeblurDiff web app: the Hugging Face Space's entry point, and `python app.py` locally.

    python app.py [--model PATH_OR_REPO] [--tokenizer ...] [--device ...] [--port ...]
    python app.py --help

The interface lives in deblurdiff/space/app.py.
"""

from deblurdiff.space.app import main

if __name__ == "__main__":
    main()
