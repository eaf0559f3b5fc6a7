"""Paged blocks page: renders with defaults, buttons step the pool, the URL replays it, garbage falls back."""

from tests.app.conftest import assert_clean


def click(at, label):
    next(b for b in at.button if b.label == label).click().run()
    assert_clean(at)
    return at


def table(at, column):
    """The first table on the page that has ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_defaults_render_every_section(page):
    at = page("paged_blocks")
    assert [h.value for h in at.header] == ["Step through prefill and decode", "Storage is not attention",
                                            "Fragmentation: contiguous vs paged", "Paged attention check"]
    assert "steps" not in at.query_params
    assert len(table(at, "block_table")) == 0  # nothing allocated yet
    frag = table(at, "waste_pct")
    assert frag["allocator"].tolist() == ["contiguous, max length", "contiguous, exact length", "paged"]
    assert float(table(at, "max_abs_diff").loc[0, "max_abs_diff"]) < 1e-5


def test_the_attention_check_reports_medians_spreads_and_the_load(page):
    at = page("paged_blocks")
    check = table(at, "max_abs_diff").iloc[0]
    assert check.repeats >= 10
    assert check.warmup >= 1
    assert check.paged_ms_q1 <= check.paged_ms <= check.paged_ms_q3
    assert check.paged_vs_contiguous in ("faster", "slower", "within noise")
    note = next(c.value for c in at.caption if c.value.startswith("max |paged - contiguous|"))
    assert "IQR" in note
    assert "warm-ups" in note
    assert "1-min load" in note


def test_buttons_step_the_pool_and_write_the_url(page):
    at = page("paged_blocks")
    click(at, "Prefill")
    assert at.query_params["steps"] == "P0"
    assert table(at, "block_table")["request"].tolist() == ["r0"]
    click(at, "Decode step")
    click(at, "Fork")
    assert at.query_params["steps"] == "P0.D.C0"
    assert table(at, "block_table")["forked_from"].tolist() == ["", "r0"]
    click(at, "Finish")
    assert table(at, "block_table")["request"].tolist() == ["r1"]
    click(at, "Reset")
    assert "steps" not in at.query_params
    assert len(table(at, "block_table")) == 0


def test_url_replays_the_same_pool(page):
    at = page("paged_blocks", {"steps": "P0.P1.D.C1", "bs": "8", "blocks": "32", "apc": "true"})
    assert at.segmented_control(key="bs").value == 8
    assert at.slider(key="blocks").value == 32
    tables = table(at, "block_table")
    assert tables["request"].tolist() == ["r0", "r1", "r2"]
    assert tables["num_cached_tokens"].tolist() == [0, 0, 0]  # block size 8: prompts share only 6 words
    assert any("Step 4: r2: fork of r1" in i.value for i in at.info)
    events = table(at, "event")
    assert events["action"].max() == 4
    assert (events["event"] == "fork").sum() == 2


def test_garbage_steps_fall_back_with_a_warning(page):
    for bad in ("P9.zz", "P0.X7"):
        at = page("paged_blocks", {"steps": bad})
        assert any("steps" in w.value for w in at.warning), bad
        assert len(table(at, "block_table")) == 0


def test_garbage_widget_values_fall_back_to_defaults(page):
    at = page("paged_blocks", {"bs": "7", "blocks": "999", "dist": "zipf", "kdt": "float64"})
    assert at.segmented_control(key="bs").value == 4
    assert at.slider(key="blocks").value == 16
    assert at.segmented_control(key="dist").value == "lognormal"
    assert not at.error


def test_example_button_replays_the_shared_prefix_and_fork_example(page):
    at = page("paged_blocks")
    example = next(b for b in at.button if b.label.startswith("Example"))
    example.click().run()
    assert not at.exception
    assert at.query_params["steps"] == "P0.P1.D.D.C0.D"
    tables = at.dataframe[0].value.to_csv()
    assert "r2" in tables  # the fork of r0 holds a block table


def test_after_example_the_request_select_shows_the_request_the_page_uses(page):
    # A select first drawn with no options kept "Choose an option" in the browser once r0-r2 existed, while Fork
    # forked r0: the page writes its choice to the session, so the browser is sent the value (set_value) too.
    at = page("paged_blocks")
    assert at.selectbox(key="req").options == []
    click(at, "Example: shared prefix, then a fork")
    select = at.selectbox(key="req")
    assert select.options == ["r0", "r1", "r2"]
    assert select.value == "r0"
    assert select.proto.set_value
    select.set_value("r2").run()
    click(at, "Fork")
    assert at.query_params["steps"].endswith(".C2")  # Fork forks the request shown
    click(at, "Finish")
    assert at.query_params["steps"].endswith(".C2.X2")
    assert at.selectbox(key="req").value == "r0"  # r2 finished: back to the first running request
    reopened = page("paged_blocks", {"steps": "P0.P1.D.D.C0.D", "req": "r1"})  # the URL of a choice brings it back
    assert reopened.selectbox(key="req").value == "r1"
    assert not reopened.warning


def test_block_labels_fit_beside_each_other_at_every_block_size():
    # At block size 8 the labels ran into each other ("e2d1#1 ref=1 d0c7#2"): each label must fit the distance to
    # the next block's label, across and down, in the main column's width.
    from kvcore.paged import stepper, views
    from tests.app.test_figures import MAIN_PX
    from ui.paged_figures import LABEL_CHAR_PX, LABEL_FONT_PX, block_grid_figure

    for block_size in (1, 2, 4, 8, 16):
        config = stepper.StepperConfig(tuple(stepper.DEFAULT_PROMPTS), 64, block_size, True)
        grid = views.block_grid(stepper.replay(config, stepper.load_actions(stepper.EXAMPLE, config)))
        fig = block_grid_figure(grid, block_size)
        label = fig.data[2]
        x_px = (MAIN_PX - fig.layout.margin.l - fig.layout.margin.r) / (fig.layout.xaxis.range[1]
                                                                         - fig.layout.xaxis.range[0])
        y_px = (fig.layout.height - fig.layout.margin.t - fig.layout.margin.b) / (fig.layout.yaxis.range[1]
                                                                               - fig.layout.yaxis.range[0])
        across = min(b - a for a, b in zip(label.x, label.x[1:], strict=False) if b > a) * x_px
        widest = max(len(line) for text in label.text for line in text.split("<br>")) * LABEL_CHAR_PX
        assert widest + 6 <= across, (block_size, widest, across)
        lines = max(text.count("<br>") + 1 for text in label.text)
        row_bottoms = sorted({shape.y0 for shape in fig.layout.shapes}, reverse=True)
        second_row_foot = sorted(set(label.y), reverse=True)[1]
        room = (row_bottoms[0] - second_row_foot) * y_px  # from a label's foot to the blocks of the row above
        assert lines * LABEL_FONT_PX * 1.3 <= room, (block_size, lines, room)
        if block_size == 8:
            assert any("<br>" in text for text in label.text)  # the hash is on its own line
