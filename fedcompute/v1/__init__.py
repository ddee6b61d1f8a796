"""Generated protocol stubs (never edited by hand; see scripts/gen_protos.sh)."""
