-- The disk the one-disk layouts (flat, lvm_hba) put the OS on, by serial
-- or WWN, as an operator names it (seed 004). NULL: the layout's default.
ALTER TABLE machines ADD COLUMN system_disk TEXT;
