-- keybroker schema, version 4: each data key records its own budget.
--
-- budget is the number of encryptions the data key may perform, fixed when
-- it is created (the creating Store's Config.Budget). Every process
-- reserves within LEAST(budget, its own Config.Budget), so a process
-- configured with a larger budget (an operator's CLI left at the default,
-- say) can never take another process's key past the budget it was made
-- with. Keys created before this migration get DefaultBudget (2^24), the
-- most any earlier default allowed.
ALTER TABLE {{.schema}}.data_keys
    ADD COLUMN budget bigint NOT NULL DEFAULT 16777216
    CHECK (budget BETWEEN 1 AND 4294967296);
