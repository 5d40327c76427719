"""Shared types every area uses: the persona pack, records, persona/version names and the adapter key,
errors, the home folder, atomic writes, content fingerprints and row reading. Imports nothing of ours."""
