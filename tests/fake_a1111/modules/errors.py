"""Fake ``modules.errors``: records what would be printed."""

reported: list = []


def report(message, *, exc_info=False):
    import sys

    reported.append((message, sys.exc_info()[1] if exc_info else None))


def display(e, task, *, full_traceback=False):
    reported.append((task, e))
