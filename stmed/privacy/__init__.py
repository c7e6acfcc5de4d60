"""What leaves the hospital: the burned-in-text gate, the audit of images sent, the judge host allowlist,
and the guard against benchmark images in the self-play pool. Imports ``stmed.data`` only; self-play and
the judge call it."""
