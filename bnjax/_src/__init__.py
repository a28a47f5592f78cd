"""Implementation of bnjax. Import from :mod:`bnjax`, not from here."""
