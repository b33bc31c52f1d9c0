"""Model families: one small interface (`base.ModelFamily`), one module per family."""
