"""What the AWS IoT Device SDK scripts of tests/aws_sdk.rs share."""
import sys
from concurrent.futures import Future


class Waiter:
    """Collects what a callback receives; `take()` waits for the next one."""
    def __init__(self):
        self.items = []; self.future = Future()
    def __call__(self, item):
        self.items.append(item)
        if not self.future.done():
            self.future.set_result(None)
    def take(self, timeout=10):
        self.future.result(timeout)
        item = self.items.pop(0)
        self.future = Future()
        if self.items:
            self.future.set_result(None)
        return item


def fail(what):
    print("SDK CHECK FAILED:", what, flush=True); sys.exit(1)
