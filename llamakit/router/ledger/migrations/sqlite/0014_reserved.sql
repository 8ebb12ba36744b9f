-- Reserved: version 14 is another branch's migration, in flight when batches (version 15) were written. This
-- placeholder changes nothing and gives way to that migration when the branches meet.
SELECT 1;
