"""The log bridge: tagged stderr lines the host logs at their Python level."""

import io
import logging
import sys
import unittest
import unittest.mock
import warnings

from snakepit import _logbridge


class LogBridgeTests(unittest.TestCase):
    def test_every_line_of_a_record_carries_its_level(self):
        tagged = _logbridge.tag_lines("ERROR", "boom\nTraceback...")
        self.assertEqual(tagged, "\x1esnakepit:ERROR\x1eboom\n\x1esnakepit:ERROR\x1eTraceback...")

    def test_warnings_and_configured_logging_are_tagged_and_keep_their_format(self):
        err = io.StringIO()
        root = logging.getLogger()
        saved = (root.handlers[:], root.level, warnings.showwarning)
        self.addCleanup(lambda: (setattr(root, "handlers", saved[0]), root.setLevel(saved[1])))
        self.addCleanup(setattr, warnings, "showwarning", saved[2])
        root.handlers = []
        with unittest.mock.patch.object(sys, "stderr", err):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(name)s says %(message)s"))
            root.addHandler(handler)
            _logbridge.install()
            logging.getLogger("adapter").warning("hello")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = warnings.showwarning  # the bridged one, kept by catch_warnings
                warnings.warn("careful")
        lines = err.getvalue().split("\n")  # (splitlines would split at \x1e too)
        self.assertIn("\x1esnakepit:WARNING\x1eadapter says hello", lines)
        self.assertTrue(any(l.startswith("\x1esnakepit:WARNING\x1e") and "careful" in l for l in lines), lines)

    def test_without_a_configured_handler_warnings_and_above_are_printed_tagged(self):
        err = io.StringIO()
        root = logging.getLogger()
        saved = (root.handlers[:], warnings.showwarning)
        self.addCleanup(setattr, root, "handlers", saved[0])
        self.addCleanup(setattr, warnings, "showwarning", saved[1])
        root.handlers = []
        with unittest.mock.patch.object(sys, "stderr", err):
            _logbridge.install()
            logging.getLogger("adapter").info("quiet")
            logging.getLogger("adapter").error("loud")
        self.assertEqual(err.getvalue(), "\x1esnakepit:ERROR\x1eloud\n")


if __name__ == "__main__":
    unittest.main()
