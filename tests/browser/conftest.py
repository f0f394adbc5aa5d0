"""The notebook here is opened by tests/test_browser.py in a real browser; nbval must not run it a second time."""

collect_ignore_glob = ["*.ipynb"]
